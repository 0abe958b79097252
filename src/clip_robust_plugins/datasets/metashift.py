"""``robust/metashift``: MetaShift's cat/dog indoor/outdoor task (Liang & Zou, 2022) as released.

Built only with the public reader kit.  The four folders and their codes are those of
SubpopBench's ``generate_metadata_metashift`` (github.com/YyzHarry/SubpopBench,
``subpopbench/scripts/download.py``): y dog 0 / cat 1, a outdoor 0 / indoor 1.  By default
the released train/test folders are the splits (cats indoors and dogs outdoors in train,
the reverse in test: the original shift); ``--metashift_split subpopbench`` pools the four
folders and re-splits them at random as SubpopBench does (25 % test, then 10 % val).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_robust_plugins import DatasetError, DatasetRequest, DatasetSpec, hookimpl, option, two_field_schema
from clip_robust_plugins.readers import FileDataset, FileRow, key_from_path, list_images, reader_config, require_dir

NAME = "metashift"
CLASSES = ("dog", "cat")
CONTEXTS = ("outdoor", "indoor")
RELEASE_DIR = "MetaShift-Cat-Dog-indoor-outdoor"
#: released folder -> (original split, y, a)
FOLDERS = {
    "train/cat/cat(indoor)": ("train", 1, 1),
    "train/dog/dog(outdoor)": ("train", 0, 0),
    "test/cat/cat(outdoor)": ("test", 1, 0),
    "test/dog/dog(indoor)": ("test", 0, 1),
}
#: SubpopBench's fractions: test of all images, then val of all images from the rest
TEST_FRACTION, VAL_FRACTION = 0.25, 0.1
SPLIT_MODES = ("original", "subpopbench")
TEMPLATES = ("a photo of a {c}.",)
CITATION = ("Liang & Zou, MetaShift: A Dataset of Datasets for Evaluating Contextual Distribution Shifts and "
            "Training Conflicts, ICLR 2022 (cat/dog indoor/outdoor as prepared by SubpopBench, Yang et al., ICML 2023)")


@dataclass(frozen=True)
class MetaShiftConfig:
    """``--metashift_*`` flags."""

    split: str = option("original", "original: the released train/test folders (the shift); subpopbench: "
                        "SubpopBench's seeded random train/val/test re-split of all four folders", choices=SPLIT_MODES)
    seed: int = option(42, "the re-split's seed (subpopbench mode; SubpopBench uses 42)")

    def __post_init__(self) -> None:
        if self.split not in SPLIT_MODES:
            raise DatasetError(f"--metashift_split must be one of {list(SPLIT_MODES)}, got {self.split!r}")


def resplit(n: int, seed: int) -> np.ndarray:
    """SubpopBench's split codes (0 train, 1 val, 2 test) for ``n`` pooled images, same draws."""
    rng = np.random.RandomState(seed)  # a local legacy generator: the draws SubpopBench makes
    test = rng.choice(np.arange(n), size=int(n * TEST_FRACTION), replace=False)
    val = rng.choice(np.setdiff1d(np.arange(n), test), size=int(n * VAL_FRACTION), replace=False)
    codes = np.zeros(n, dtype=np.int64)
    codes[val], codes[test] = 1, 2
    return codes


def load_metashift(request: DatasetRequest) -> FileDataset:
    config = reader_config(request, MetaShiftConfig)
    root = Path(request.root)
    base = root / RELEASE_DIR if (root / RELEASE_DIR).is_dir() else root
    pooled = []  # (original split, rel path, y, a) in SubpopBench's folder order
    for rel_dir, (split, y, a) in FOLDERS.items():
        folder = require_dir(base / rel_dir, f"robust/{NAME} ({CLASSES[y]} {CONTEXTS[a]})")
        names = list_images(folder)
        if not names:
            raise DatasetError(f"{folder}: no images")
        pooled += [(split, f"{rel_dir}/{name}", y, a) for name in names]
    splits = [s for s, *_ in pooled]
    if config.split == "subpopbench":
        splits = [("train", "val", "test")[c] for c in resplit(len(pooled), config.seed)]
    rows: dict[str, list[FileRow]] = {}
    for split, (_, rel, y, a) in zip(splits, pooled):
        rows.setdefault(split, []).append(FileRow(key_from_path(rel), os.path.join(base, rel), (y, a), {}, f"{base} {rel}"))
    return FileDataset(
        name=NAME, root=base, schema=two_field_schema(CLASSES, CONTEXTS), classnames=CLASSES, templates=TEMPLATES,
        rows=rows, options={"split": config.split, **({"seed": config.seed} if config.split == "subpopbench" else {})},
    )


@hookimpl
def register_datasets(register) -> None:
    register(DatasetSpec(
        name=NAME, load=load_metashift, citation=CITATION, options=MetaShiftConfig, option_prefix="metashift_",
        description="MetaShift cat/dog indoor/outdoor from the released train/ and test/ folders "
                    "(or SubpopBench's random re-split)",
    ))
