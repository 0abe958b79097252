"""Grouped WebDataset shards: the on-disk layout, a streaming reader and a writer.

The layout is a superset of clip_benchmark's ``wds/`` layout, so plain
``clip_benchmark eval --dataset wds/NAME --dataset_root DIR`` reads our shards::

    DIR/{train,val,test}/nshards.txt, 0.tar, 1.tar, ...
    DIR/classnames.txt
    DIR/zeroshot_classification_templates.txt      (templates use {c})
    DIR/groups.json                                (ours: fields, value names, counts)

Each sample holds ``<key>.png`` (the image), ``<key>.cls`` (the class id, for
clip_benchmark), ``<key>.json`` (the field values by name, e.g. ``{"y": 1, "a": 0}``,
plus optional extras such as ``box``) and optionally ``<key>.mask.png`` (a foreground
mask).  ``groups.json`` is written last and marks a complete dataset.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ..groups import GROUPS_FILE, GroupSchema
from .base import DatasetError, RobustDataset, apply_transform, order_key, wants_sample

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
NSHARDS_FILE = "nshards.txt"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def has_groups(root: str | os.PathLike) -> bool:
    """True when ``root`` is a local grouped-shard directory (has ``groups.json``)."""
    return (Path(root) / GROUPS_FILE).is_file()


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _identity_nodesplitter(src, group=None):
    return src


class GroupedShards(RobustDataset):
    """Reads a local grouped-shard directory; streams samples in shard order."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        groups_path = self.root / GROUPS_FILE
        if not groups_path.is_file():
            raise DatasetError(f"{groups_path}: file not found (not a grouped shard directory)")
        self.schema = GroupSchema.read(groups_path)
        self.metadata = json.loads(groups_path.read_text())
        self.classnames = _read_lines(self.root / CLASSNAMES_FILE)
        self.templates = _read_lines(self.root / TEMPLATES_FILE)
        if len(self.classnames) != len(self.schema.classnames):
            raise DatasetError(
                f"{self.root / CLASSNAMES_FILE}: {len(self.classnames)} class names but {GROUPS_FILE} declares "
                f"{len(self.schema.classnames)} values for field {self.schema.class_field!r}"
            )

    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(p.parent.name for p in self.root.glob(f"*/{NSHARDS_FILE}")))

    def shard_paths(self, split: str) -> list[Path]:
        nshards_path = self.root / split / NSHARDS_FILE
        if not nshards_path.is_file():
            raise DatasetError(f"{nshards_path}: file not found (split {split!r} has no shards; splits: {list(self.splits())})")
        try:
            nshards = int(nshards_path.read_text().strip())
        except ValueError:
            raise DatasetError(f"{nshards_path}: expected an integer shard count") from None
        paths = [self.root / split / f"{i}.tar" for i in range(nshards)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{missing[0]}: shard listed in {nshards_path} is missing")
        return paths

    def fingerprint(self, split: str) -> str:
        h = hashlib.sha256()
        h.update((self.root / GROUPS_FILE).read_bytes())
        for p in self.shard_paths(split):
            st = p.stat()
            h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def samples(self, split: str, transform: Callable | None) -> torch.utils.data.IterableDataset:
        urls = [str(p) for p in self.shard_paths(split)]
        return self._pipeline(urls).map(_SampleDecoder(self.schema, transform))

    def ordered_samples(
        self, split: str, transform: Callable | None, rank: int = 0, world_size: int = 1
    ) -> torch.utils.data.IterableDataset:
        """Shards ``rank, rank + world_size, ...`` (then split across DataLoader workers),
        each sample tagged with (shard index, position in shard)."""
        urls = [str(p) for p in self.shard_paths(split)]
        mine = urls[rank::world_size]
        if not mine:  # more ranks than shards: this rank reads nothing
            return _NoSamples()
        index_of_url = {url: i for i, url in enumerate(urls)}
        tag = functools.partial(_tag_order, index_of_url=index_of_url)
        return self._pipeline(mine).compose(tag).map(_OrderedDecoder(_SampleDecoder(self.schema, transform)))

    def _pipeline(self, urls: list[str]) -> wds.WebDataset:
        return wds.WebDataset(
            urls,
            shardshuffle=False,  # evaluation: deterministic order
            nodesplitter=_identity_nodesplitter,  # ranks are split explicitly in ordered_samples
            workersplitter=wds.split_by_worker,  # each DataLoader worker reads distinct shards
            empty_check=False,  # more DataLoader workers than shards must not crash
        )

    def describe(self) -> dict[str, Any]:
        return {"type": "grouped_shards", "root": str(self.root), "generator": self.metadata.get("generator")}


class _NoSamples(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def _tag_order(samples, index_of_url: Mapping[str, int]):
    """Adds ``__order__`` = (shard index, position in the shard) to each raw sample."""
    positions: dict[str, int] = {}
    for sample in samples:
        url = sample["__url__"]
        position = positions.get(url, 0)
        positions[url] = position + 1
        sample["__order__"] = (index_of_url[url], position)
        yield sample


@dataclass
class _OrderedDecoder:
    """Decodes a tagged sample into ``(order, key, image, fields)``."""

    decode: Callable

    def __call__(self, sample: Mapping[str, Any]):
        return (order_key(*sample["__order__"]), *self.decode(sample))


@dataclass
class _SampleDecoder:
    """Turns a raw webdataset sample into a :data:`SampleTuple` (picklable for workers)."""

    schema: GroupSchema
    transform: Callable | None

    def __call__(self, sample: Mapping[str, Any]) -> tuple[str, torch.Tensor, torch.Tensor]:
        key = sample["__key__"]
        where = f"{sample.get('__url__', '?')}: sample {key!r}: "
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
            raise DatasetError(f"{where}no image entry (expected one of {IMAGE_EXTENSIONS})")
        if "json" not in sample:
            raise DatasetError(f"{where}no json entry with the group metadata")
        try:
            image = Image.open(io.BytesIO(sample[image_ext]))
            image.load()
        except Exception as exc:  # noqa: BLE001 - re-raised with the sample named
            raise DatasetError(f"{where}undecodable image ({exc})") from None
        try:
            meta = json.loads(sample["json"])
            values = [int(meta[name]) for name in self.schema.field_names]
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{where}bad metadata json ({type(exc).__name__}: {exc})") from None
        self.schema.validate_values(np.asarray([values]), where=where)
        mask = None
        if "mask.png" in sample and wants_sample(self.transform):  # decoded only for view/region transforms
            try:
                mask = Image.open(io.BytesIO(sample["mask.png"])).convert("L")
            except Exception as exc:  # noqa: BLE001 - re-raised with the sample named
                raise DatasetError(f"{where}undecodable mask ({exc})") from None
        image_tensor = apply_transform(self.transform, key, image, meta, mask)
        return key, image_tensor, torch.tensor(values, dtype=torch.int64)


class GroupedShardWriter:
    """Writes one split of a grouped-shard dataset into a staging directory.

    Use :func:`write_grouped_dataset` for the whole dataset; it stages every file and
    moves them into place only when all splits are complete.
    """

    def __init__(self, split_dir: Path, schema: GroupSchema, max_count: int = 1000):
        self.split_dir = split_dir
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.max_count = max_count
        # a fixed mtime makes the tar bytes a function of the samples alone (reproducible shards)
        self._writer = wds.ShardWriter(str(split_dir / "%d.tar"), maxcount=max_count, verbose=0, mtime=0)
        self._values: list[list[int]] = []
        self._keys: set[str] = set()

    def write(
        self,
        key: str,
        image: Image.Image,
        values: Mapping[str, int],
        extra: Mapping[str, Any] | None = None,
        mask: Image.Image | None = None,
    ) -> None:
        if "." in key or "/" in key:
            raise DatasetError(f"sample key {key!r} must not contain '.' or '/'")
        if key in self._keys:
            raise DatasetError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        row = [int(values[name]) for name in self.schema.field_names]
        self.schema.validate_values(np.asarray([row]), where=f"sample {key!r}: ")
        self._values.append(row)
        meta = {name: v for name, v in zip(self.schema.field_names, row)}
        meta.update(extra or {})
        sample = {
            "__key__": key,
            "png": _png_bytes(image),
            "cls": str(row[self.schema.class_index]).encode(),
            "json": json.dumps(meta).encode(),
        }
        if mask is not None:
            sample["mask.png"] = _png_bytes(mask)
        self._writer.write(sample)

    def close(self) -> tuple[int, ...]:
        """Finish the split; returns its full-product counts."""
        nshards = max(1, self._writer.shard)  # read before close(): ShardWriter.close() deletes .shard
        self._writer.close()
        if not self._values:
            raise DatasetError(f"{self.split_dir}: split has no samples")
        (self.split_dir / NSHARDS_FILE).write_text(f"{nshards}\n")
        return self.schema.full_counts(np.asarray(self._values))


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_grouped_dataset(
    root: str | os.PathLike,
    schema: GroupSchema,
    templates: Sequence[str],
    splits: Mapping[str, Iterable[tuple[str, Image.Image, Mapping[str, int], Mapping[str, Any] | None, Image.Image | None]]],
    extra_metadata: Mapping[str, Any] | None = None,
    max_count: int = 1000,
    progress: Callable[[Iterable, str], Iterable] | None = None,
) -> GroupSchema:
    """Write a complete grouped-shard dataset into ``root``, atomically per file set.

    ``splits`` maps split names to iterables of ``(key, image, values, extra, mask)``.
    Everything is staged in a temporary directory beside ``root`` and moved into place
    at the end, ``groups.json`` last, so an interrupted run leaves no dataset that
    looks complete.  Returns the schema with the measured per-split counts.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        counts = {}
        for split, items in splits.items():
            writer = GroupedShardWriter(stage / split, schema, max_count=max_count)
            iterable = progress(items, split) if progress else items
            for key, image, values, extra, mask in iterable:
                writer.write(key, image, values, extra, mask)
            counts[split] = writer.close()
        final = GroupSchema(schema.fields, schema.class_field, dict(schema.groupings), counts)
        (stage / CLASSNAMES_FILE).write_text("\n".join(schema.classnames) + "\n")
        (stage / TEMPLATES_FILE).write_text("\n".join(templates) + "\n")
        (stage / GROUPS_FILE).write_text(json.dumps(final.to_json(extra_metadata), indent=1))
        (root / GROUPS_FILE).unlink(missing_ok=True)  # the old dataset stops looking complete first
        for split in splits:
            target = root / split
            if target.exists():
                shutil.rmtree(target)
            os.replace(stage / split, target)
        for name in (CLASSNAMES_FILE, TEMPLATES_FILE, GROUPS_FILE):
            os.replace(stage / name, root / name)
        return final
    finally:
        shutil.rmtree(stage, ignore_errors=True)
