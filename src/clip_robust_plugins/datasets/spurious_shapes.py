"""``robust/spurious_shapes``: a procedural Waterbirds-like benchmark that needs no download.

Two classes (the object's shape, the *core* feature) times two backgrounds (the
*spurious* attribute ``a``), grouped as ``g = y * 2 + a`` like Waterbirds:

- ``y``: ``square`` / ``diamond`` (the square turned by 45 degrees), a filled shape at a
  random position and size, in a colour drawn independently of class and background,
  with equal area for both shapes so size says nothing about the class -- the *harder*
  feature: it has to be read from edge orientations, with per-pixel noise;
- ``a``: ``land`` / ``water``, a noisy colour filling the whole image -- an *easy*
  feature.

In the train split a fraction ``correlation`` (0.95 by default; exact counts, rounded)
of each class sits on "its" background (square on land, diamond on water), so a model trained there
leans on the background; val and test are group-balanced (equal counts per group).
Every sample carries the object's pixel box (``extra["box"] = [x0, y0, x1, y1]``,
PIL crop convention: ``x1``/``y1`` exclusive) and a mode ``"L"`` mask (255 on the
object), the foreground/background views that SEraser and RaVL use.

Generation is a pure function of :class:`ShapesConfig`: each split draws from its own
``numpy.random.default_rng([seed, split_index])`` stream (a seed *sequence*, so seed
``s`` split ``k`` never collides with seed ``s + 1`` split ``k - 1`` as ``seed + k``
would), and the shard files are byte-identical across runs.  The config is stored in
``groups.json`` (``generator.config``); loading a root generated with other settings
is an error rather than a silent mismatch.

The tiny open_clip model shipped in ``clip_robust_plugins/assets`` (``crp-tiny``) was
trained on a 95%-correlated train split of this generator (data seed 1, 4000 images)
with captions from :data:`TEMPLATES` (see ``scripts/train_tiny_clip.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..argtypes import option
from ..groups import GroupSchema, two_field_schema
from ..hookspecs import hookimpl
from ..specs import DatasetRequest, DatasetSpec
from .base import DatasetError, RobustDataset
from .generated import config_json, generator_metadata, open_generated, progress_bars

NAME = "spurious_shapes"
CLASSNAMES = ("square", "diamond")
BACKGROUNDS = ("land", "water")
SPLITS = ("train", "val", "test")
#: zero-shot prompt templates; also the captions the shipped tiny model was trained with
TEMPLATES = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a {c} shape.",
)

# Rendering constants (RGB, 0..255).  Background: a base colour per attribute value,
# a per-image colour jitter and per-pixel noise.  Object: one of a palette of colours
# that contrast with both backgrounds, chosen independently of class and background.
_BACKGROUND_RGB = np.array([[150.0, 130.0, 80.0], [60.0, 105.0, 175.0]])  # land, water
_BACKGROUND_JITTER = 18.0
_PIXEL_NOISE = 22.0
_OBJECT_PALETTE = np.array(
    [
        [225.0, 45.0, 45.0],  # red
        [235.0, 215.0, 60.0],  # yellow
        [240.0, 240.0, 240.0],  # white
        [200.0, 60.0, 200.0],  # magenta
        [25.0, 25.0, 25.0],  # black
        [245.0, 140.0, 30.0],  # orange
    ]
)
_OBJECT_JITTER = 15.0
#: object size as a fraction of the image side: the radius of the disc whose area every shape has
_RADIUS_RANGE = (0.18, 0.30)
#: the shape drawn for each class index
_SHAPES = CLASSNAMES

_SPLIT_INDEX = {split: i for i, split in enumerate(SPLITS)}
#: bumped whenever the rendering changes, so data made by older code is not mistaken for ours
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ShapesConfig:
    """Everything the generated data depends on (stored in ``groups.json``)."""

    train_size: int = option(2000, "number of train images")
    val_size: int = option(400, "number of val images, rounded down to a multiple of 4 groups")
    test_size: int = option(400, "number of test images, rounded down to a multiple of 4 groups")
    correlation: float = option(0.95, "fraction of each class on its own background in the train "
                                      "split; val/test are group-balanced")
    image_size: int = option(32, "image side in pixels")
    seed: int = option(0, "dataset-generation seed, separate from the run's --seed")
    classnames: tuple[str, ...] = CLASSNAMES
    backgrounds: tuple[str, ...] = BACKGROUNDS

    def __post_init__(self) -> None:
        n_groups = len(self.classnames) * len(self.backgrounds)
        if len(self.classnames) != 2 or len(self.backgrounds) != 2:
            raise DatasetError("spurious_shapes has exactly two classes and two backgrounds")
        if self.train_size < len(self.classnames):
            raise DatasetError(f"--shapes_train_size must be at least {len(self.classnames)}, got {self.train_size}")
        for flag, size in (("--shapes_val_size", self.val_size), ("--shapes_test_size", self.test_size)):
            if size < n_groups:
                raise DatasetError(f"{flag} must be at least {n_groups} (one sample per group), got {size}")
        if not 0.0 <= self.correlation <= 1.0:
            raise DatasetError(f"--shapes_correlation must be in [0, 1], got {self.correlation}")
        if self.image_size < 8:
            raise DatasetError(f"--shapes_image_size must be at least 8, got {self.image_size}")
        if self.seed < 0:
            raise DatasetError(f"--shapes_seed must be non-negative, got {self.seed}")

    @property
    def n_groups(self) -> int:
        return len(self.classnames) * len(self.backgrounds)

    def group_counts(self, split: str) -> np.ndarray:
        """Samples per group ``g = y * 2 + a`` for ``split`` (what the generator writes)."""
        if split == "train":
            counts = np.zeros(self.n_groups, dtype=np.int64)
            per_class = [self.train_size // 2, self.train_size - self.train_size // 2]
            for y, n_y in enumerate(per_class):
                aligned = int(round(self.correlation * n_y))
                counts[y * 2 + y] = aligned  # the class's "own" background: a == y
                counts[y * 2 + (1 - y)] = n_y - aligned
            return counts
        size = {"val": self.val_size, "test": self.test_size}[split]
        return np.full(self.n_groups, size // self.n_groups, dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        """The config as it reads back from ``groups.json`` (tuples become lists)."""
        return config_json(self)



# ------------------------------------------------------------------ rendering
def render_sample(rng: np.random.Generator, y: int, a: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (size, size, 3) uint8 and its object mask (size, size) bool."""
    base = _BACKGROUND_RGB[a] + rng.normal(0.0, _BACKGROUND_JITTER, 3)
    image = base + rng.normal(0.0, _PIXEL_NOISE, (size, size, 3))

    radius = rng.uniform(*_RADIUS_RANGE) * size
    mask = _shape_mask(_SHAPES[y], radius, size, rng)

    colour = _OBJECT_PALETTE[rng.integers(len(_OBJECT_PALETTE))] + rng.normal(0.0, _OBJECT_JITTER, 3)
    n_obj = int(mask.sum())
    image[mask] = colour + rng.normal(0.0, _PIXEL_NOISE, (n_obj, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _shape_mask(shape: str, radius: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a filled ``shape`` with the area of a disc of ``radius``, at a random position."""
    if shape == "square":
        extent = radius * math.sqrt(math.pi) / 2.0  # half side
    elif shape == "diamond":
        extent = radius * math.sqrt(math.pi / 2.0)  # half diagonal
    else:  # pragma: no cover - guarded by the constant
        raise ValueError(f"unknown shape {shape!r}")
    cx, cy = rng.uniform(extent, size - extent, 2)
    centres = np.arange(size) + 0.5
    dx = np.abs(centres[None, :] - cx)
    dy = np.abs(centres[:, None] - cy)
    if shape == "square":
        return (dx <= extent) & (dy <= extent)
    return dx + dy <= extent


def mask_box(mask: np.ndarray) -> list[int]:
    """Tight pixel box ``[x0, y0, x1, y1]`` of a boolean mask (x1/y1 exclusive, PIL crop order)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def iter_split(
    config: ShapesConfig, split: str
) -> Iterator[tuple[str, Image.Image, dict[str, int], dict, Image.Image]]:
    """The samples of ``split`` as ``(key, image, values, extra, mask)``, deterministic in ``config``."""
    rng = np.random.default_rng([config.seed, _SPLIT_INDEX[split]])
    counts = config.group_counts(split)
    groups = np.repeat(np.arange(config.n_groups), counts)
    groups = groups[rng.permutation(len(groups))]
    width = max(6, len(str(len(groups) - 1)))
    for i, g in enumerate(groups):
        y, a = divmod(int(g), len(config.backgrounds))
        pixels, mask = render_sample(rng, y, a, config.image_size)
        yield (
            f"shapes_{split}_{i:0{width}d}",
            Image.fromarray(pixels, mode="RGB"),
            {"y": y, "a": a},
            {"box": mask_box(mask)},
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L"),
        )


def schema_for(config: ShapesConfig) -> GroupSchema:
    return two_field_schema(config.classnames, config.backgrounds)


def generate(root: str | os.PathLike, config: ShapesConfig, progress: bool = True, shard_size: int = 1000) -> GroupSchema:
    """Write the dataset for ``config`` into ``root`` (grouped WebDataset shards of ``shard_size`` samples).

    The shard size changes the files, not the samples or their order, so it is not part of ``config``.
    """
    from .wds import write_grouped_dataset

    totals = {split: int(config.group_counts(split).sum()) for split in SPLITS}
    return write_grouped_dataset(
        root,
        schema_for(config),
        TEMPLATES,
        {split: iter_split(config, split) for split in SPLITS},
        extra_metadata=generator_metadata(NAME, GENERATOR_VERSION, config),
        progress=progress_bars(NAME, totals, progress),
        max_count=shard_size,
    )


# ---------------------------------------------------------------------- loading
def load_spurious_shapes(request: DatasetRequest) -> RobustDataset:
    """Open (generating on first use) the shards for the requested config at ``request.root``."""
    return open_generated(
        request, name=NAME, version=GENERATOR_VERSION, config=request.config or ShapesConfig(),
        flag_prefix="shapes_", splits=SPLITS, generate=lambda root, config: generate(root, config, progress=True),
    )


# ------------------------------------------------------------------------ hooks
@hookimpl
def register_datasets(register) -> None:
    register(
        DatasetSpec(
            name=NAME,
            load=load_spurious_shapes,
            description=(
                "procedural Waterbirds-like benchmark: square/diamond (class y) on land/water backgrounds "
                "(spurious a), 95%-correlated train split, group-balanced val/test, object masks and boxes; "
                "generated into --dataset_root on first use"
            ),
            citation="",
            options=ShapesConfig,
            option_prefix="shapes_",
        )
    )

