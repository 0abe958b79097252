"""TPT's augmented views: random resized crops (and flips) of one decoded image, as a cached
feature kind, so the extractor decodes each test image once and embeds its views beside it.

The authors' views for the natural-distribution-shift sets are torchvision's
``RandomResizedCrop`` + ``RandomHorizontalFlip`` of the raw image.  Those transforms draw
from torch's process-wide generator, so here the crop box and the flip are drawn from a
local numpy generator seeded by (run seed, salt, sample key) only (views then do not depend
on read order or DataLoader workers), with torchvision's sampling rule, and applied with
``torchvision.transforms.functional``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image

from ...datasets.base import SampleImage
from ..seraser.views import sample_rng
from .config import NAME

#: torchvision RandomResizedCrop's aspect-ratio range (its default)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: tries at a box before the centre-crop fallback (torchvision's rule)
TRIES = 10
SALT = "tpt/views"


def crop_box(width: int, height: int, scale_min: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop, by torchvision's rule: area fraction
    uniform in ``[scale_min, 1]``, log aspect ratio uniform in ``log(RATIO)``, ten tries, then
    the largest centred box within the ratio range."""
    area = width * height
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(TRIES):
        target = area * float(rng.uniform(scale_min, 1.0))
        aspect = math.exp(float(rng.uniform(lo, hi)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class CropViews:
    """``derive(sample)`` of the views kind: ``n_views`` random resized crops of the decoded
    image, each resized to a square of the image's shorter side (the model's own
    preprocessing then resizes it to its resolution), flipped with probability 0.5."""

    def __init__(self, n_views: int, scale_min: float = 0.08, flip: bool = True, seed: int = 0):
        self.n_views = n_views
        self.scale_min = scale_min
        self.flip = flip
        self.seed = seed
        self.config = (
            f"random_resized_crop:n={n_views},scale=({scale_min},1),ratio=(3/4,4/3),interpolation=bilinear,"
            f"size=shorter_side,flip={flip},seed={seed}"
        )

    def __call__(self, sample: SampleImage) -> list[Image.Image]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = sample.image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        rng = sample_rng(self.seed, sample.key, SALT)
        out = []
        for _ in range(self.n_views):
            top, left, h, w = crop_box(width, height, self.scale_min, rng)
            view = TF.resized_crop(image, top, left, h, w, [side, side], InterpolationMode.BILINEAR, antialias=True)
            if self.flip and float(rng.random()) < 0.5:
                view = TF.hflip(view)
            out.append(view)
        return out


def views_kind(n_views: int, scale_min: float, flip: bool, seed: int):
    """The cached (N, n_views, D) feature kind of the test images' views."""
    from ...features import ImageSetKind

    derive = CropViews(n_views, scale_min, flip, seed)
    # the config's digest in the name: the run context memoises features by kind *name*
    digest = hashlib.sha256(derive.config.encode()).hexdigest()[:8]
    return ImageSetKind(name=f"{NAME}_views/crops-{digest}", derive=derive, count=n_views, config=derive.config)
