"""Which per-sample annotations (foreground masks, object boxes) a split has, decided without
decoding an image, so ``--seraser_views auto`` can pick its provider and ``masks``/``boxes``
can be refused in ``check`` before the model is built or any feature extracted.

What each dataset type tells cheaply:

- a dataset with a ``sample_annotations(split)`` method (``{"mask": bool | None, "box": bool | None}``)
  is asked first (the hook a third-party reader can implement; grouped shards answer from the
  ``annotations`` record that ``groups.json`` has when our writer wrote them; None: unknown);
- file datasets (Waterbirds, CelebA, SubpopBench, image folders): their readers never give
  masks; a box is in the parsed metadata rows (``FileRow.extra["box"]``), already in memory;
- local grouped shards: the tar headers list each sample's entries (``<key>.mask.png``),
  read without the image data; boxes need each sample's small json entry, read only when
  asked; clip_benchmark's class-only shards carry neither;
- anything else (remote shards, unknown readers): unknown (None).  ``auto`` then takes the
  no-segmenter views; an explicit ``masks``/``boxes`` runs and fails per sample if one lacks it.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import AUTO, AUTO_FALLBACK

#: the annotation each built-in provider reads
NEEDS = {"masks": "mask", "boxes": "box"}
_NAMES = {"mask": "foreground masks", "box": "object boxes ('box' in the sample metadata)"}


@dataclass(frozen=True)
class Resolved:
    """The provider ``--seraser_views`` resolved to, and why."""

    name: str
    reason: str


def split_annotations(dataset: Any, split: str, wanted: tuple[str, ...] = ("mask", "box")) -> dict[str, bool | None]:
    """``{annotation: True (every sample has it) | False (some sample lacks it) | None (unknown)}``."""
    declared = getattr(dataset, "sample_annotations", None)
    got = declared(split) if callable(declared) else None
    if got is not None:
        return {a: got.get(a) for a in wanted}
    from ...datasets.files import FileDataset
    from ...datasets.plain_wds import ClassOnlyShards
    from ...datasets.wds import GroupedShards

    if isinstance(dataset, FileDataset):
        rows = dataset.rows(split)
        return {a: (False if a == "mask" else all("box" in r.extra for r in rows)) for a in wanted}
    if isinstance(dataset, ClassOnlyShards):
        return {a: False for a in wanted}
    if isinstance(dataset, GroupedShards) and not dataset.source.remote:
        shards = dataset.shard_paths(split)
        if all(isinstance(p, Path) for p in shards):
            return _scan_shards(shards, wanted)
    return {a: None for a in wanted}


def _scan_shards(shards: list[Path], wanted: tuple[str, ...]) -> dict[str, bool | None]:
    """Every sample's entries from the tar headers (data skipped); json entries read only for boxes."""
    has = {a: True for a in wanted}
    for path in shards:
        entries: dict[str, set[str]] = {}
        boxed: set[str] = set()
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                stem, _, ext = base.partition(".")
                key = posixpath.join(folder, stem)
                entries.setdefault(key, set()).add(ext)
                if "box" in wanted and ext == "json" and has["box"]:
                    handle = tar.extractfile(member)
                    try:
                        meta = json.loads(handle.read()) if handle is not None else {}
                    except ValueError:
                        meta = {}  # the reader reports a bad json by name; here it just has no box
                    if isinstance(meta, dict) and meta.get("box") is not None:
                        boxed.add(key)
        for key in entries:
            if "mask" in wanted and "mask.png" not in entries[key]:
                has["mask"] = False
            if "box" in wanted and key not in boxed:
                has["box"] = False
        if not any(has.values()):
            break
    return has


def resolve_views(requested: str, dataset: Any, dataset_name: str, split: str) -> Resolved:
    """The provider a run uses: ``auto`` resolved from the split's annotations; ``masks``/``boxes``
    refused (ValueError, one line naming the dataset and provider) where the split lacks them."""
    if requested == AUTO:
        mask = split_annotations(dataset, split, ("mask",))["mask"]
        if mask:
            return Resolved("masks", f"auto: every sample of split {split!r} has a foreground mask")
        box = split_annotations(dataset, split, ("box",))["box"]
        if box:
            return Resolved("boxes", f"auto: no masks, every sample of split {split!r} has a box")
        known = "has no masks or boxes on every sample" if mask is False and box is False else "declares no masks or boxes"
        return Resolved(AUTO_FALLBACK, f"auto: split {split!r} {known}; no-segmenter views")
    annotation = NEEDS.get(requested)
    if annotation is not None:
        have = split_annotations(dataset, split, (annotation,))[annotation]
        if have is False:
            raise ValueError(
                f"{dataset_name} split {split!r} has no {_NAMES[annotation]} on every sample, which "
                f"--seraser_views {requested} needs; use --seraser_views auto, augment or authors (no segmenter)"
            )
        return Resolved(requested, "requested" if have else "requested (the dataset does not declare its annotations)")
    return Resolved(requested, "requested")
