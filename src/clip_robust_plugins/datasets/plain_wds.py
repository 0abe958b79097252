"""clip_benchmark's own ``wds/`` shards (no ``groups.json``), read as a class-only dataset.

Shards written by clip_benchmark's exporter (``clip_benchmark_export_wds``,
``clip_benchmark.webdataset_builder.convert_dataset``) hold an image and a ``cls``
entry per sample, plus ``classnames.txt`` and ``zeroshot_classification_templates.txt``:
no group annotation.  :class:`ClassOnlyShards` reads them with a one-field schema
(the class ``y``), so our engine still evaluates them -- the per-group keys are then
per-class keys (``group_acc/y:cat``), ``worst_group_acc`` is the worst-class accuracy,
and mitigations that need group labels refuse to run.  ``has_group_labels`` is False,
which makes the engine say so on stderr and in the results (``robust.note``).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..groups import GROUPS_FILE, Field, GroupSchema
from .bad_samples import SkippedSample
from .base import DatasetError, apply_transform
from .sources import shard_identity
from .wds import CLASSNAMES_FILE, IMAGE_EXTENSIONS, TEMPLATES_FILE, GroupedShards, _read_lines

DATASET_TYPE_FILE = "dataset_type.txt"


def is_class_only_root(root: str | os.PathLike) -> bool:
    """A local clip_benchmark classification shard directory without our ``groups.json``."""
    root_str = str(root)
    if "://" in root_str:
        return False
    path = Path(root_str)
    if not path.is_dir() or (path / GROUPS_FILE).is_file() or not (path / CLASSNAMES_FILE).is_file():
        return False
    type_file = path / DATASET_TYPE_FILE
    return not type_file.is_file() or type_file.read_text().strip().lower() in ("", "classification")


class ClassOnlyShards(GroupedShards):
    """clip_benchmark-exported shards: class labels from ``cls``, no groups (groups = classes)."""

    has_group_labels = False

    def __init__(self, root: str | os.PathLike):  # no groups.json to read, unlike the parent
        self.root = Path(root)
        self.classnames = _read_lines(self.root / CLASSNAMES_FILE)
        if not self.classnames:
            raise DatasetError(f"{self.root / CLASSNAMES_FILE}: no class names")
        templates = self.root / TEMPLATES_FILE
        # clip_benchmark accepts a missing templates file when --custom_template_file is given
        self.templates = _read_lines(templates) if templates.is_file() else []
        self.schema = GroupSchema((Field("y", tuple(self.classnames)),), class_field="y")
        self.metadata: dict[str, Any] = {}
        self._shards: dict[str, list] = {}  # the parent's per-split memos (used for remote roots only)
        self._fingerprints: dict[str, str] = {}

    def sample_annotations(self, split: str) -> dict[str, Any] | None:
        """clip_benchmark's shards carry an image and a class label, nothing else."""
        return {"mask": False, "box": False}

    def fingerprint(self, split: str) -> str:
        h = hashlib.sha256()
        h.update((self.root / CLASSNAMES_FILE).read_bytes())
        for p in self.shard_paths(split):
            h.update(shard_identity(str(p)).encode())
        return h.hexdigest()[:16]

    def decoder(self, transform: Callable | None) -> Callable:
        return _ClassDecoder(len(self.classnames), transform)

    def describe(self) -> dict[str, Any]:
        return {"type": "class_only_shards", "root": str(self.root), "note": "no group metadata"}


@dataclass
class _ClassDecoder:
    """A clip_benchmark sample (image + ``cls``) -> ``(key, image, [y])`` (picklable for workers)."""

    n_classes: int
    transform: Callable | None

    def __call__(self, sample: Mapping[str, Any]) -> tuple[str, Any, torch.Tensor] | SkippedSample:
        key = sample["__key__"]
        where = f"{sample.get('__url__', '?')}: sample {key!r}: "
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
            raise DatasetError(f"{where}no image entry (expected one of {IMAGE_EXTENSIONS})")
        if "cls" not in sample:
            raise DatasetError(f"{where}no cls entry (the class label)")
        try:
            y = int(sample["cls"])
        except ValueError:
            raise DatasetError(f"{where}cls entry {sample['cls'][:20]!r} is not an integer") from None
        if not 0 <= y < self.n_classes:
            raise DatasetError(f"{where}class {y} is out of range 0..{self.n_classes - 1} ({CLASSNAMES_FILE})")
        try:
            image = Image.open(io.BytesIO(sample[image_ext]))
            image.load()
        except Exception as exc:  # noqa: BLE001 - reported with the sample named (or skipped on request)
            return SkippedSample(key, (y,), f"{where}undecodable image ({type(exc).__name__}: {exc})")
        return key, apply_transform(self.transform, key, image, {"y": y}), torch.tensor([y], dtype=torch.int64)
