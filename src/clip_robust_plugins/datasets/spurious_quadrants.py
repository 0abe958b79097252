"""``robust/spurious_quadrants``: RaVL's synthetic setting, with region labels, generated offline.

Varma et al., "RaVL: Discovering and Mitigating Spurious Correlations in Fine-Tuned
Vision-Language Models", NeurIPS 2024 (arXiv 2411.04097), evaluate discovery on images
made of four quadrants: one quadrant holds the class object (an MNIST digit there), a
second one holds a red rectangle in about half of the images, the rest are empty, and a
fine-tuning split is sampled so that the rectangle co-occurs with one class.  This is
the same construction with this package's square/diamond objects (the
``robust/spurious_shapes`` renderer), so the shipped tiny model can read it:

- a canvas of ``image_size`` x ``image_size`` pixels (64 by default, so each quadrant
  is 32 px, the tiny model's input size) on a neutral grey, noisy background;
- ``y``: ``square`` / ``diamond``, drawn in one random quadrant (the object's pixels,
  palette and noise come from :func:`~clip_robust_plugins.datasets.spurious_shapes.render_sample`);
- ``a``: ``no_patch`` / ``patch``: when ``a = 1`` another random quadrant is filled
  with a noisy cyan patch (a colour outside the object palette), the planted spurious
  feature.

Groups are ``g = y * 2 + a``.  In the train split a fraction ``correlation`` (0.95) of
the squares has no patch and the same fraction of the diamonds has one, so the patch
predicts "diamond"; val and test are group-balanced (the patch is independent of the
class), the setting in which RaVL looks for the learned correlation.

Region ground truth (for Precision@K and RaVL's validity check; never read by
discovery) is in every sample's json: ``regions`` (the four quadrant boxes, in the
order top-left, top-right, bottom-left, bottom-right, PIL crop convention with x1/y1
exclusive), ``object_quadrant`` and ``spurious_quadrant`` (index into ``regions``, -1
without a patch), ``spurious_box`` (the patch's box or null) and ``box`` (the object's
tight box); ``<key>.mask.png`` is the object mask, so foreground/background methods run
here too.

Generation is a pure function of :class:`QuadrantsConfig` (stored in ``groups.json``),
one ``numpy.random.default_rng([seed, split_index])`` stream per split, byte-identical
shards across runs.  The ``crp-tiny`` checkpoint ``spurious_quadrants`` (registered
here) is the shipped ``spurious_shapes`` model fine-tuned on a train split of this
generator by ``scripts/train_quadrants_model.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..argtypes import option
from ..groups import GroupSchema, two_field_schema
from ..hookspecs import hookimpl
from ..specs import CheckpointSpec, DatasetRequest, DatasetSpec
from .base import DatasetError, RobustDataset
from .generated import config_json, generator_metadata, open_generated, progress_bars
from .spurious_shapes import CLASSNAMES, TEMPLATES, mask_box, render_sample

NAME = "spurious_quadrants"
ATTRIBUTES = ("no_patch", "patch")
SPLITS = ("train", "val", "test")
#: the class the patch co-occurs with in the train split
SPURIOUS_CLASS = 1
_BACKGROUND_RGB = np.array([110.0, 110.0, 110.0])
_BACKGROUND_JITTER = 12.0
_PIXEL_NOISE = 22.0
_PATCH_RGB = np.array([40.0, 205.0, 205.0])  # cyan: not in the object palette
_PATCH_JITTER = 12.0
_SPLIT_INDEX = {split: i for i, split in enumerate(SPLITS)}
GENERATOR_VERSION = 1
CHECKPOINT_MODEL = "crp-tiny"
CHECKPOINT_TAG = NAME
ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass(frozen=True)
class QuadrantsConfig:
    """Everything the generated data depends on (stored in ``groups.json``)."""

    train_size: int = option(2000, "number of train images")
    val_size: int = option(400, "number of val images, rounded down to a multiple of 4")
    test_size: int = option(400, "number of test images, rounded down to a multiple of 4")
    correlation: float = option(0.95, "train fraction of squares without and diamonds with the patch")
    image_size: int = option(64, "canvas side in pixels, even (each quadrant is half of it)")
    seed: int = option(0, "dataset-generation seed, separate from the run's --seed")

    def __post_init__(self) -> None:
        if self.train_size < 2:
            raise DatasetError(f"--quadrants_train_size must be at least 2, got {self.train_size}")
        for flag, size in (("--quadrants_val_size", self.val_size), ("--quadrants_test_size", self.test_size)):
            if size < 4:
                raise DatasetError(f"{flag} must be at least 4 (one sample per group), got {size}")
        if not 0.0 <= self.correlation <= 1.0:
            raise DatasetError(f"--quadrants_correlation must be in [0, 1], got {self.correlation}")
        if self.image_size < 16 or self.image_size % 2:
            raise DatasetError(f"--quadrants_image_size must be an even number >= 16, got {self.image_size}")
        if self.seed < 0:
            raise DatasetError(f"--quadrants_seed must be non-negative, got {self.seed}")

    def group_counts(self, split: str) -> np.ndarray:
        """Samples per group ``g = y * 2 + a`` for ``split``."""
        if split == "train":
            counts = np.zeros(4, dtype=np.int64)
            per_class = [self.train_size // 2, self.train_size - self.train_size // 2]
            for y, n_y in enumerate(per_class):
                aligned = int(round(self.correlation * n_y))
                own = int(y == SPURIOUS_CLASS)  # the patch value this class co-occurs with
                counts[y * 2 + own] = aligned
                counts[y * 2 + (1 - own)] = n_y - aligned
            return counts
        size = {"val": self.val_size, "test": self.test_size}[split]
        return np.full(4, size // 4, dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        return config_json(self)



def quadrant_boxes(size: int) -> list[list[int]]:
    """The four quadrant boxes of a ``size`` x ``size`` canvas: top-left, top-right, bottom-left, bottom-right."""
    h = size // 2
    return [[0, 0, h, h], [h, 0, size, h], [0, h, h, size], [h, h, size, size]]


def render_quadrants(rng: np.random.Generator, y: int, a: int, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """One canvas (size, size, 3) uint8, its object mask (size, size) bool and its region metadata."""
    half = size // 2
    canvas = _BACKGROUND_RGB + rng.normal(0.0, _BACKGROUND_JITTER, 3) + rng.normal(0.0, _PIXEL_NOISE, (size, size, 3))
    boxes = quadrant_boxes(size)
    object_q = int(rng.integers(4))
    # the object: spurious_shapes' renderer at quadrant size; only its object pixels are used
    pixels, obj = render_sample(rng, y, 0, half)
    x0, y0 = boxes[object_q][:2]
    canvas[y0:y0 + half, x0:x0 + half][obj] = pixels[obj]
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y0 + half, x0:x0 + half] = obj
    spurious_q = -1
    if a:
        spurious_q = int(rng.choice([q for q in range(4) if q != object_q]))
        px0, py0 = boxes[spurious_q][:2]
        colour = _PATCH_RGB + rng.normal(0.0, _PATCH_JITTER, 3)
        canvas[py0:py0 + half, px0:px0 + half] = colour + rng.normal(0.0, _PIXEL_NOISE, (half, half, 3))
    extra = {
        "regions": boxes,
        "object_quadrant": object_q,
        "spurious_quadrant": spurious_q,
        "spurious_box": boxes[spurious_q] if spurious_q >= 0 else None,
        "box": mask_box(mask),
    }
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask, extra


def iter_split(config: QuadrantsConfig, split: str) -> Iterator[tuple[str, Image.Image, dict[str, int], dict, Image.Image]]:
    """The samples of ``split`` as ``(key, image, values, extra, mask)``, deterministic in ``config``."""
    rng = np.random.default_rng([config.seed, _SPLIT_INDEX[split]])
    counts = config.group_counts(split)
    groups = np.repeat(np.arange(4), counts)
    groups = groups[rng.permutation(len(groups))]
    width = max(6, len(str(len(groups) - 1)))
    for i, g in enumerate(groups):
        y, a = divmod(int(g), 2)
        pixels, mask, extra = render_quadrants(rng, y, a, config.image_size)
        yield (
            f"quadrants_{split}_{i:0{width}d}",
            Image.fromarray(pixels, mode="RGB"),
            {"y": y, "a": a},
            extra,
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L"),
        )


def schema_for(config: QuadrantsConfig) -> GroupSchema:
    return two_field_schema(CLASSNAMES, ATTRIBUTES)


def generate(root: str | os.PathLike, config: QuadrantsConfig, progress: bool = True) -> GroupSchema:
    """Write the dataset for ``config`` into ``root`` (grouped WebDataset shards)."""
    from .wds import write_grouped_dataset

    totals = {split: int(config.group_counts(split).sum()) for split in SPLITS}
    return write_grouped_dataset(
        root,
        schema_for(config),
        TEMPLATES,
        {split: iter_split(config, split) for split in SPLITS},
        extra_metadata=generator_metadata(NAME, GENERATOR_VERSION, config),
        progress=progress_bars(NAME, totals, progress),
    )


def load_spurious_quadrants(request: DatasetRequest) -> RobustDataset:
    """Open (generating on first use) the shards for the requested config at ``request.root``."""
    return open_generated(
        request, name=NAME, version=GENERATOR_VERSION, config=request.config or QuadrantsConfig(),
        flag_prefix="quadrants_", splits=SPLITS, generate=lambda root, config: generate(root, config, progress=True),
    )


# ------------------------------------------------------------------------ hooks
@hookimpl
def register_datasets(register) -> None:
    register(DatasetSpec(
        name=NAME,
        load=load_spurious_quadrants,
        description="RaVL's synthetic setting: four quadrants, a square/diamond object (class y) in one, a cyan "
                    "patch (spurious a) in another; patch predicts 'diamond' in train (0.95), independent in "
                    "val/test; quadrant boxes and region labels in each sample's json",
        citation="Varma et al., RaVL: Discovering and Mitigating Spurious Correlations in Fine-Tuned "
                 "Vision-Language Models, NeurIPS 2024",
        options=QuadrantsConfig,
        option_prefix="quadrants_",
    ))


@hookimpl
def register_checkpoints(register) -> None:
    register(CheckpointSpec(
        model=CHECKPOINT_MODEL,
        pretrained=CHECKPOINT_TAG,
        path=ASSETS / f"{CHECKPOINT_MODEL}_{CHECKPOINT_TAG}.safetensors",
        config=ASSETS / f"{CHECKPOINT_MODEL}.json",
        description="crp-tiny/spurious_shapes fine-tuned by scripts/train_quadrants_model.py on spurious_quadrants "
                    "image-caption pairs; it has learned 'cyan patch => diamond'",
    ))

