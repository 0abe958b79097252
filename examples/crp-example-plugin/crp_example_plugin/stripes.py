"""``robust/example_stripes``: a tiny procedural grouped dataset, generated on first use.

Three classes (``y``: the stripes' orientation) times two attribute values (``a``: the
stripes' colour palette), grouped ``g = y * 2 + a``.  In the train split each class
appears with its "own" palette (horizontal and diagonal: warm, vertical: cool) with
probability :data:`TRAIN_CORRELATION`; val and test hold the same number of images
in every group.  Everything is a pure function of the split size; the reader kit's
generator life cycle (``open_generated``) writes a root once and refuses to reuse it for
another ``--stripes_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clip_robust_plugins import (
    DatasetError,
    DatasetRequest,
    GroupedShards,
    generator_metadata,
    open_generated,
    option,
    reader_config,
    two_field_schema,
    write_grouped_dataset,
)

NAME = "example_stripes"
CLASSES = ("horizontal", "vertical", "diagonal")
PALETTES = ("warm", "cool")
SPLITS = ("train", "val", "test")
TEMPLATES = ("a picture of {c} stripes.", "an image with {c} stripes.")
DEFAULT_SIZE = 60
IMAGE_SIZE = 32
TRAIN_CORRELATION = 0.9
GENERATOR_VERSION = 1

_COLOURS = {
    "warm": np.array([[225.0, 60.0, 40.0], [240.0, 160.0, 40.0], [230.0, 215.0, 70.0]]),
    "cool": np.array([[40.0, 90.0, 225.0], [40.0, 175.0, 120.0], [60.0, 200.0, 225.0]]),
}


def group_counts(size: int, split: str) -> np.ndarray:
    """Images per group ``y * 2 + a`` in ``split`` for ``size`` images per split."""
    n_groups = len(CLASSES) * len(PALETTES)
    if split != "train":
        return np.full(n_groups, size // n_groups, dtype=np.int64)
    counts = np.zeros(n_groups, dtype=np.int64)
    per_class = np.full(len(CLASSES), size // len(CLASSES))
    per_class[: size % len(CLASSES)] += 1
    for y, n in enumerate(per_class):
        own = y % 2  # horizontal, diagonal -> warm (0); vertical -> cool (1)
        counts[y * 2 + own] = round(TRAIN_CORRELATION * n)
        counts[y * 2 + 1 - own] = n - counts[y * 2 + own]
    return counts


def render(rng: np.random.Generator, y: int, a: int) -> Image.Image:
    """Two-tone stripes of orientation ``y`` in palette ``a``, with per-pixel noise."""
    coords = np.arange(IMAGE_SIZE) + 0.5
    xx, yy = np.meshgrid(coords, coords)
    t = (yy, xx, (xx + yy) / np.sqrt(2.0))[y]
    period = rng.uniform(5.0, 9.0)
    on = ((t + rng.uniform(0.0, period)) % period) < period / 2
    palette = _COLOURS[PALETTES[a]]
    stripe = palette[rng.integers(len(palette))] + rng.normal(0.0, 12.0, 3)
    gap = np.full(3, 45.0) + rng.normal(0.0, 10.0, 3)
    pixels = np.where(on[..., None], stripe, gap) + rng.normal(0.0, 15.0, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def iter_split(size: int, split: str):
    """``(key, image, values, extra, mask)`` for every image of ``split`` (deterministic)."""
    rng = np.random.default_rng([GENERATOR_VERSION, SPLITS.index(split)])
    groups = np.repeat(np.arange(len(CLASSES) * len(PALETTES)), group_counts(size, split))
    for i, g in enumerate(rng.permutation(groups)):
        y, a = divmod(int(g), len(PALETTES))
        yield f"stripes_{split}_{i:05d}", render(rng, y, a), {"y": y, "a": a}, None, None


@dataclass(frozen=True)
class StripesConfig:
    """``--stripes_*`` flags (declared with ``DatasetSpec(options=StripesConfig, option_prefix="stripes_")``)."""

    size: int = option(DEFAULT_SIZE, "images per split")

    def __post_init__(self) -> None:
        if self.size < len(CLASSES) * len(PALETTES):
            raise DatasetError(f"{NAME}: --stripes_size must be at least 6 (one image per group), got {self.size}")


def generate(root: Path, config: StripesConfig) -> None:
    write_grouped_dataset(
        root,
        two_field_schema(CLASSES, PALETTES),
        TEMPLATES,
        {split: iter_split(config.size, split) for split in SPLITS},
        extra_metadata=generator_metadata(NAME, GENERATOR_VERSION, config),
    )


def load(request: DatasetRequest) -> GroupedShards:
    """Open the shards at ``request.root``, generating them on first use; the kit's life cycle
    refuses a root generated with another size (or by another generator) instead of mixing data."""
    config = reader_config(request, StripesConfig)
    return open_generated(request, name=NAME, version=GENERATOR_VERSION, config=config, flag_prefix="stripes_",
                          splits=SPLITS, generate=generate)
