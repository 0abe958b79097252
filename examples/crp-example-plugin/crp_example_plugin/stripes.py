"""``robust/example_stripes``: a tiny procedural grouped dataset, generated on first use.

Three classes (``y``: the stripes' orientation) times two attribute values (``a``: the
stripes' colour palette), grouped ``g = y * 2 + a``.  In the train split each class
appears with its "own" palette (horizontal and diagonal: warm, vertical: cool) with
probability :data:`TRAIN_CORRELATION`; val and test hold the same number of images
in every group.  Everything is a pure function of the split size, so a root is
regenerated only when ``--stripes_size`` changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from clip_robust_plugins import DatasetError, DatasetRequest, GroupedShards, two_field_schema, write_grouped_dataset

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
_OWN_ENTRIES = {*SPLITS, "classnames.txt", "zeroshot_classification_templates.txt"}


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


def _generator_info(size: int) -> dict:
    return {"name": NAME, "version": GENERATOR_VERSION, "size": size}


def generate(root: Path, size: int) -> None:
    write_grouped_dataset(
        root,
        two_field_schema(CLASSES, PALETTES),
        TEMPLATES,
        {split: iter_split(size, split) for split in SPLITS},
        extra_metadata={"generator": _generator_info(size)},
    )


def load(request: DatasetRequest) -> GroupedShards:
    """Open the shards at ``request.root``, generating them when missing or of another size."""
    size = getattr(request.options, "stripes_size", None)
    size = DEFAULT_SIZE if size is None else int(size)
    if size < len(CLASSES) * len(PALETTES):
        raise DatasetError(f"{NAME}: --stripes_size must be at least 6 (one image per group), got {size}")
    root = Path(request.root)
    groups = root / "groups.json"
    if groups.is_file():
        try:
            stored = json.loads(groups.read_text()).get("generator") or {}
        except (ValueError, AttributeError) as exc:
            raise DatasetError(f"{groups}: unreadable ({exc})") from None
        if stored.get("name") != NAME:
            raise DatasetError(f"{root}: holds another dataset ({stored.get('name')!r}); choose another --dataset_root")
        if stored == _generator_info(size):
            return GroupedShards(root)
    elif root.is_dir():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise DatasetError(f"{root}: not empty ({', '.join(foreign[:3])}); choose another --dataset_root for {NAME}")
    print(f"crp_example_plugin: generating robust/{NAME} ({size} images per split) into {root}", file=sys.stderr)
    generate(root, size)
    return GroupedShards(root)
