"""The built-in foreground/background view providers and the cached feature kind of a provider's views.

A provider is a picklable ``provider(sample) -> SampleViews`` with ``n_foreground``,
``n_background`` and a ``config`` string (the feature-cache key).  Every random view comes
from a generator seeded by the run seed and the sample key only, so views (and their cached
features) do not depend on the order or the process in which samples are read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ...datasets.base import DatasetError, SampleImage
from ...plugins import PluginError
from ...specs import SampleViews
from .config import NAME, ViewOptions

#: neutral grey: the ``gray`` fills
GRAY_RGB = (128, 128, 128)
#: the cutout colour of the authors' ``randaugment.py``
CUTOUT_RGB = (125, 123, 114)
#: geometric ops per strong augmentation: the authors' ``nosam_aug`` is their RandAugment(1),
#: their ``raw_aug`` (augmentations of masked background views) their RandAugment(2)
AUGMENT_OPS = 1
MASK_AUG_OPS = 2


def sample_seed(seed: int, key: str, salt: str) -> int:
    """A 63-bit seed for one sample's views: a function of the run seed and the sample key only."""
    digest = hashlib.sha256(f"{seed}\0{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_rng(seed: int, key: str, salt: str) -> np.random.Generator:
    """A numpy generator for one sample's views (see :func:`sample_seed`)."""
    return np.random.default_rng(sample_seed(seed, key, salt))


def strong_augment(image: Image.Image, rng: np.random.Generator, n_ops: int = 1) -> Image.Image:
    """The authors' strong augmentation (their ``randaugment.py``): ``n_ops`` ops drawn with
    replacement from {rotate +-30 degrees, shear x/y +-0.3, translate x/y +-30% of the side},
    each at a uniform magnitude, then a cutout square of side up to half the width."""
    w, h = image.size
    for _ in range(n_ops):
        op = int(rng.integers(5))
        if op == 0:
            image = image.rotate(float(rng.uniform(-30.0, 30.0)))
        elif op == 1:
            image = image.transform(image.size, Image.AFFINE, (1, float(rng.uniform(-0.3, 0.3)), 0, 0, 1, 0))
        elif op == 2:
            image = image.transform(image.size, Image.AFFINE, (1, 0, 0, float(rng.uniform(-0.3, 0.3)), 1, 0))
        elif op == 3:
            image = image.transform(image.size, Image.AFFINE, (1, 0, float(rng.uniform(-0.3, 0.3)) * w, 0, 1, 0))
        else:
            image = image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, float(rng.uniform(-0.3, 0.3)) * h))
    side = float(rng.uniform(0.0, 0.5)) * w
    cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
    x0, y0 = int(max(0.0, cx - side / 2)), int(max(0.0, cy - side / 2))
    x1, y1 = min(w, x0 + side), min(h, y0 + side)
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, x1, y1), CUTOUT_RGB)
    return image


def _views_config(options: ViewOptions, seed: int, n_aug: int, **extra: Any) -> str:
    """The provider's cache-key string; the seed only where views are random."""
    fields = {**extra, "n_aug": n_aug, "n_fg_aug": options.n_fg_aug}
    if n_aug + options.n_fg_aug:
        fields["seed"] = seed
    return ",".join(f"{k}={v}" for k, v in fields.items())


class MaskViews:
    """``masks`` / ``boxes``: foreground and background from the dataset's mask or box."""

    def __init__(self, options: ViewOptions, source: str = "mask", seed: int = 0):
        if source not in ("mask", "box"):
            raise ValueError(f"seraser: unknown mask source {source!r}")
        self.options = options
        self.source = source
        self.seed = seed
        self.n_aug = options.n_aug_for("masks" if source == "mask" else "boxes")
        self.n_foreground = 1 + options.n_fg_aug
        self.n_background = 1 + self.n_aug
        aug = {"aug_ops": MASK_AUG_OPS} if self.n_aug + options.n_fg_aug else {}
        self.config = ("masks:" if source == "mask" else "boxes:") + _views_config(
            options, seed, self.n_aug, fg_fill=options.fg_fill, bg_fill=options.bg_fill, **aug
        )

    def _mask(self, sample: SampleImage) -> np.ndarray:
        w, h = sample.image.size
        if self.source == "mask":
            if sample.mask is None:
                raise DatasetError(
                    f"sample {sample.key!r}: no foreground mask for --seraser_views masks; this dataset has none "
                    "(use --seraser_views auto, boxes, augment, authors, or a segmenter plugin's views)"
                )
            if sample.mask.size != (w, h):
                raise DatasetError(f"sample {sample.key!r}: mask of size {sample.mask.size} for an image of {(w, h)}")
            return np.array(sample.mask.convert("L")) > 127
        box = sample.meta.get("box")
        if box is None:
            raise DatasetError(
                f"sample {sample.key!r}: no 'box' in its metadata for --seraser_views boxes "
                "(use --seraser_views auto, masks, augment, authors, or a segmenter plugin's views)"
            )
        try:
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        except (TypeError, ValueError):
            raise DatasetError(f"sample {sample.key!r}: box {box!r} is not [x0, y0, x1, y1]") from None
        mask = np.zeros((h, w), dtype=bool)
        mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
        return mask

    def __call__(self, sample: SampleImage) -> SampleViews:
        o = self.options
        mask = self._mask(sample)[..., None]
        pixels = np.array(sample.image.convert("RGB"), dtype=np.float32)
        fg_fill = np.array(GRAY_RGB if o.fg_fill == "gray" else (0, 0, 0), dtype=np.float32)
        if o.bg_fill == "mean" and (~mask).any():
            bg_fill = pixels[~mask[..., 0]].mean(axis=0)
        elif o.bg_fill == "black":
            bg_fill = np.zeros(3, dtype=np.float32)
        else:
            bg_fill = np.array(GRAY_RGB, dtype=np.float32)
        fg = Image.fromarray(np.rint(np.where(mask, pixels, fg_fill)).astype(np.uint8), mode="RGB")
        bg = Image.fromarray(np.rint(np.where(mask, bg_fill, pixels)).astype(np.uint8), mode="RGB")
        rng = sample_rng(self.seed, sample.key, "seraser/views")
        fgs = [fg] + [strong_augment(fg, rng, MASK_AUG_OPS) for _ in range(o.n_fg_aug)]
        bgs = [bg] + [strong_augment(bg, rng, MASK_AUG_OPS) for _ in range(self.n_aug)]
        return SampleViews(tuple(fgs), tuple(bgs))


class AugmentViews:
    """``augment`` (no segmenter): the raw image as foreground; it and strong augmentations of it as background."""

    def __init__(self, options: ViewOptions, seed: int = 0):
        self.options = options
        self.seed = seed
        self.n_aug = options.n_aug_for("augment")
        self.n_foreground = 1 + options.n_fg_aug
        self.n_background = 1 + self.n_aug
        self.config = "augment:" + _views_config(options, seed, self.n_aug, aug_ops=AUGMENT_OPS, cutout="authors")

    def __call__(self, sample: SampleImage) -> SampleViews:
        o = self.options
        raw = sample.image.convert("RGB")
        rng = sample_rng(self.seed, sample.key, "seraser/views")
        fgs = [raw] + [strong_augment(raw, rng, AUGMENT_OPS) for _ in range(o.n_fg_aug)]
        bgs = [raw] + [strong_augment(raw, rng, AUGMENT_OPS) for _ in range(self.n_aug)]
        return SampleViews(tuple(fgs), tuple(bgs))


class AuthorsViews:
    """``authors`` (no segmenter): the raw image as foreground; it and torchvision
    ``RandAugment(num_ops=2)`` views of it (15 by default) as background.

    torchvision's RandAugment draws from the process-wide torch generator; each sample's
    views are drawn inside ``torch.random.fork_rng`` with the CPU generator seeded from
    (run seed, sample key), so they do not depend on read order or worker, and the global
    generator's state is restored afterwards (CUDA generators are never touched).
    """

    def __init__(self, options: ViewOptions, seed: int = 0):
        self.options = options
        self.seed = seed
        self.n_aug = options.n_aug_for("authors")
        self.n_foreground = 1 + options.n_fg_aug
        self.n_background = 1 + self.n_aug
        self.config = "authors:" + _views_config(
            options, seed, self.n_aug, randaugment=f"torchvision(num_ops={options.randaugment_ops},"
            f"magnitude={options.randaugment_magnitude})",
        )
        self._augment = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_augment": None}  # rebuilt in each worker

    def __call__(self, sample: SampleImage) -> SampleViews:
        import torch
        from torchvision.transforms import RandAugment

        o = self.options
        if self._augment is None:
            self._augment = RandAugment(num_ops=o.randaugment_ops, magnitude=o.randaugment_magnitude)
        raw = sample.image.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, sample.key, "seraser/authors"))
            fgs = [raw] + [self._augment(raw) for _ in range(o.n_fg_aug)]
            bgs = [raw] + [self._augment(raw) for _ in range(self.n_aug)]
        return SampleViews(tuple(fgs), tuple(bgs))


def make_provider(name: str, options: ViewOptions, seed: int = 0) -> Callable[[SampleImage], SampleViews]:
    """A built-in provider by name; ``seed`` (the run's) draws the random views."""
    if name in ("masks", "boxes"):
        return MaskViews(options, "mask" if name == "masks" else "box", seed)
    if name == "augment":
        return AugmentViews(options, seed)
    if name == "authors":
        return AuthorsViews(options, seed)
    raise ValueError(f"seraser: no built-in view provider {name!r}")


class ProviderImages:
    """The :class:`ImageSetKind` derivation: a provider's foreground then background views, checked."""

    def __init__(self, provider: Callable[[SampleImage], SampleViews], name: str):
        self.provider = provider
        self.name = name
        self.n_foreground, self.n_background = provider_counts(provider, name)

    def __call__(self, sample: SampleImage) -> list[Image.Image]:
        views = self.provider(sample)
        if not isinstance(views, SampleViews):
            raise PluginError(f"view provider {self.name!r} returned {type(views).__name__}, not SampleViews")
        if len(views.foreground) != self.n_foreground or len(views.background) != self.n_background:
            raise PluginError(
                f"view provider {self.name!r}: sample {sample.key!r} got {len(views.foreground)} foreground and "
                f"{len(views.background)} background views, declared {self.n_foreground} and {self.n_background}"
            )
        return [*views.foreground, *views.background]


def provider_counts(provider: Any, name: str) -> tuple[int, int]:
    """The declared (n_foreground, n_background) of a provider object."""
    counts = []
    for attr in ("n_foreground", "n_background"):
        value = getattr(provider, attr, None)
        if not isinstance(value, int) or value < (1 if attr == "n_foreground" else 0):
            raise PluginError(
                f"view provider {name!r}: the provider object needs an int attribute `{attr}` (views per sample), "
                f"got {value!r}"
            )
        counts.append(value)
    return counts[0], counts[1]


def view_kind(provider: Callable[[SampleImage], SampleViews], name: str):
    """The cached (N, n_foreground + n_background, D) feature kind of a provider's views."""
    from ...features import ImageSetKind

    derive = ProviderImages(provider, name)
    config = getattr(provider, "config", None)
    if not isinstance(config, str):
        raise PluginError(f"view provider {name!r}: the provider object needs a `config` string (it keys the cache)")
    # the config's digest in the name: the run context memoises features by kind *name*
    digest = hashlib.sha256(config.encode()).hexdigest()[:8]
    return ImageSetKind(
        name=f"{NAME}_views/{name}-{digest}",
        derive=derive,
        count=derive.n_foreground + derive.n_background,
        config=config,
    )


def black_image_features(model: Any, transform: Callable, device: str, amp: bool):
    """(D,) normalised features of the all-black image, through the model's own preprocessing."""
    import torch

    from ...features import autocast, encode_image_normalized

    image = transform(Image.new("RGB", (224, 224))).unsqueeze(0).to(device)
    with torch.no_grad(), autocast(device, amp):
        return encode_image_normalized(model, image)[0].float()
