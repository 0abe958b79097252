"""Grouped WebDataset shards: the on-disk layout, a streaming reader and a writer.

The layout is a superset of clip_benchmark's ``wds/`` layout, so plain
``clip_benchmark eval --dataset wds/NAME --dataset_root DIR`` reads our shards::

    DIR/{train,val,test}/nshards.txt, 0.tar, 1.tar, ...
    DIR/classnames.txt
    DIR/zeroshot_classification_templates.txt      (templates use {c})
    DIR/groups.json                                (ours: fields, value names, counts)

``DIR`` may also be an http(s) URL, and ``--shard_pattern`` may name the shards with
brace patterns instead of ``nshards.txt``; see :mod:`.sources` (no shell ever runs).
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
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..groups import GROUPS_FILE, GroupSchema, GroupSchemaError
from .bad_samples import SkippedSample
from .base import DatasetError, RobustDataset, apply_transform, order_key, wants_sample
from .sources import DataRoot, expand_shard_pattern, is_url, shard_identity, shard_pipeline

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import webdataset as wds

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
NSHARDS_FILE = "nshards.txt"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def has_groups(root: str | os.PathLike) -> bool:
    """True when ``root`` is a grouped-shard directory or http(s) root (has ``groups.json``)."""
    if is_url(root):
        return DataRoot.parse(root).read_bytes(GROUPS_FILE, missing_ok=True) is not None
    return (Path(root) / GROUPS_FILE).is_file()


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _lines(source: DataRoot, name: str) -> list[str]:
    """The non-empty stripped lines of a text file under a local or remote root."""
    return [line.strip() for line in (source.read_text(name) or "").splitlines() if line.strip()]


#: the splits probed on a root that cannot be listed (a URL) and declares no counts
DEFAULT_SPLITS = ("train", "val", "test")


#: the groups.json entry recording, per split, which annotations the samples carry
ANNOTATIONS_KEY = "annotations"


class GroupedShards(RobustDataset):
    """Reads grouped shards from a local directory or an http(s) root; streams samples in shard order.

    ``shard_pattern`` (``--shard_pattern``) names each split's shards with a brace
    pattern containing ``{split}`` instead of ``{split}/nshards.txt`` + ``{i}.tar``;
    ``allow_pipe_urls`` (``--allow_pipe_urls``) lets such a pattern be a ``pipe:`` command.
    Local roots without a pattern list and stat their shards as before (same cache keys).
    """

    shard_pattern: str | None = None
    allow_pipe_urls: bool = False

    def __init__(self, root: str | os.PathLike, shard_pattern: str | None = None, allow_pipe_urls: bool = False):
        self._source = DataRoot.parse(root)
        self.root = self._source.location if self._source.remote else Path(self._source.metadata_base)
        self.shard_pattern = shard_pattern
        self.allow_pipe_urls = allow_pipe_urls
        if shard_pattern is not None:
            expand_shard_pattern(self._source, shard_pattern, "train", allow_pipe_urls)  # bad patterns fail now
        groups_where = self._source.metadata(GROUPS_FILE)
        self._groups_bytes = self._source.read_bytes(GROUPS_FILE, missing_ok=True)
        if self._groups_bytes is None:
            raise DatasetError(f"{groups_where}: file not found (not a grouped shard directory)")
        try:
            self.metadata = json.loads(self._groups_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GroupSchemaError(f"{groups_where}: not valid JSON ({exc})") from None
        if not isinstance(self.metadata, dict):
            raise GroupSchemaError(f"{groups_where}: expected a JSON object")
        self.schema = GroupSchema.from_json(self.metadata, source=groups_where)
        self.classnames = _lines(self._source, CLASSNAMES_FILE)
        self.templates = _lines(self._source, TEMPLATES_FILE)
        if len(self.classnames) != len(self.schema.classnames):
            raise DatasetError(
                f"{self._source.metadata(CLASSNAMES_FILE)}: {len(self.classnames)} class names but {GROUPS_FILE} "
                f"declares {len(self.schema.classnames)} values for field {self.schema.class_field!r}"
            )
        self._shards: dict[str, list[Path | str]] = {}  # remote roots: nshards.txt fetched once per split
        self._fingerprints: dict[str, str] = {}  # remote roots: one HEAD per shard per run

    @property
    def source(self) -> DataRoot:
        """Where the files live (subclasses that skip ``__init__`` get it from ``root``)."""
        if "_source" not in self.__dict__:
            self._source = DataRoot.parse(self.root)
        return self._source

    def splits(self) -> tuple[str, ...]:
        """Local: directories with ``nshards.txt``, and declared splits (``groups.json`` counts) whose
        directory exists, so a missing ``nshards.txt`` is reported by name.  URL roots: the declared
        and default splits whose ``nshards.txt`` exists (fetched once).  Shard patterns: the
        declared splits, else ``train``/``val``/``test``."""
        declared = set(self.schema.split_counts)
        if self.shard_pattern is not None:
            return tuple(sorted(declared)) if declared else DEFAULT_SPLITS
        if not self.source.remote:
            base = Path(self.source.metadata_base)
            found = {p.parent.name for p in base.glob(f"*/{NSHARDS_FILE}")}
            return tuple(sorted(found | {s for s in declared if (base / s).is_dir()}))
        if "_remote_splits" not in self.__dict__:
            candidates = sorted(declared | set(DEFAULT_SPLITS))
            self._remote_splits = tuple(
                s for s in candidates if self.source.read_bytes(s, NSHARDS_FILE, missing_ok=True) is not None
            )
        return self._remote_splits

    def shard_paths(self, split: str) -> list[Path | str]:
        """The split's shards in order: Paths for local files, strings for URLs (and opted-in ``pipe:``)."""
        memo = self.__dict__.setdefault("_shards", {})  # also for subclasses that skip __init__
        if split in memo:
            return list(memo[split])
        if self.shard_pattern is not None:
            names = expand_shard_pattern(self.source, self.shard_pattern, split, self.allow_pipe_urls)
            shards: list[Path | str] = [n if "://" in n or n.startswith("pipe:") else Path(n) for n in names]
        else:
            nshards_where = self.source.metadata(split, NSHARDS_FILE)
            text = self.source.read_text(split, NSHARDS_FILE, missing_ok=True)
            if text is None:
                raise DatasetError(
                    f"{nshards_where}: file not found (the shard count of split {split!r})"
                )
            try:
                nshards = int(text.strip())
            except ValueError:
                nshards = 0
            if nshards < 1:
                raise DatasetError(f"{nshards_where}: expected a positive integer shard count, got {text.strip()[:20]!r}")
            locations = [self.source.shard(split, f"{i}.tar") for i in range(nshards)]
            shards = locations if is_url(self.source.shard_base) else [Path(p) for p in locations]
        missing = [str(p) for p in shards if isinstance(p, Path) and not p.is_file()]
        if missing:
            listed = f"named by --shard_pattern {self.shard_pattern!r}" if self.shard_pattern else f"listed in {nshards_where}"
            raise DatasetError(f"{missing[0]}: shard {listed} is missing")
        if self.source.remote:
            memo[split] = shards
        return list(shards)

    def fingerprint(self, split: str) -> str:
        """groups.json's bytes and each shard's identity (local: path, size, mtime; http(s): ETag,
        Last-Modified, size from a HEAD request, once per split)."""
        memo = self.__dict__.setdefault("_fingerprints", {})
        if split in memo:
            return memo[split]
        h = hashlib.sha256()
        groups = self.__dict__.get("_groups_bytes")
        h.update(groups if groups is not None else self.source.read_bytes(GROUPS_FILE))
        for p in self.shard_paths(split):
            h.update(shard_identity(str(p)).encode())
        digest = h.hexdigest()[:16]
        if self.source.remote:
            memo[split] = digest
        return digest

    def samples(self, split: str, transform: Callable | None) -> torch.utils.data.IterableDataset:
        """Every sample; an undecodable image is an error here (only the extractor may skip one)."""
        urls = [str(p) for p in self.shard_paths(split)]
        return self._pipeline(urls).map(_Strict(self.decoder(transform)))

    def ordered_samples(
        self, split: str, transform: Callable | None, rank: int = 0, world_size: int = 1
    ) -> torch.utils.data.IterableDataset:
        """Shards ``rank, rank + world_size, ...`` (then split across DataLoader workers),
        each sample tagged with (shard index, position in shard)."""
        urls = [str(p) for p in self.shard_paths(split)]
        mine = urls[rank::world_size]
        if not mine:  # more ranks than shards: this rank reads nothing
            from .parts import NoSamples

            return NoSamples()
        index_of_url = {url: i for i, url in enumerate(urls)}
        tag = functools.partial(_tag_order, index_of_url=index_of_url)
        return self._pipeline(mine).compose(tag).map(_OrderedDecoder(self.decoder(transform)))

    def decoder(self, transform: Callable | None) -> Callable[[Mapping[str, Any]], tuple[str, Any, torch.Tensor]]:
        """Raw webdataset sample -> :data:`SampleTuple` (picklable; subclasses read other entries)."""
        return _SampleDecoder(self.schema, transform)

    def _pipeline(self, urls: list[str]) -> wds.FluidWrapper:
        """Raw samples of ``urls`` in order, each DataLoader worker reading distinct shards (none
        for workers beyond the shard count); shards are opened by our own opener, never by
        webdataset's ``gopen`` (which runs curl or a shell), see :func:`.sources.shard_pipeline`.
        Ranks are split explicitly in ``ordered_samples``; nothing is shuffled."""
        return shard_pipeline(urls, allow_pipe=self.allow_pipe_urls)

    def sample_annotations(self, split: str) -> dict[str, Any] | None:
        """What every sample of ``split`` carries, from ``groups.json`` (written with the shards):
        ``{"mask": bool, "box": bool, "json_keys": {key: count}, "samples": n}``; for local shards
        written without that record, the same read from the tar headers and json entries (once);
        None for remote ones without it (unknown)."""
        record = (self.metadata.get(ANNOTATIONS_KEY) or {}).get(split)
        if not isinstance(record, dict) or "samples" not in record:
            return self._scanned_annotations(split)
        n, keys = record["samples"], record.get("json_keys", {})
        return {"mask": record.get("masks") == n, "box": keys.get("box") == n, "json_keys": keys, "samples": n}

    def _scanned_annotations(self, split: str) -> dict[str, Any] | None:
        if self.source.remote:
            return None
        memo = self.__dict__.setdefault("_scanned", {})
        if split not in memo:
            shards = self.shard_paths(split)
            if not all(isinstance(p, Path) for p in shards):
                return None
            from .shard_annotations import scan_shards

            memo[split] = scan_shards(shards)
        return memo[split]

    def describe(self) -> dict[str, Any]:
        out = {"type": "grouped_shards", "root": str(self.root), "generator": self.metadata.get("generator")}
        if self.shard_pattern is not None:
            out["shard_pattern"] = self.shard_pattern
        return out


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
        order = order_key(*sample["__order__"])
        out = self.decode(sample)
        if isinstance(out, SkippedSample):  # an undecodable image: the extractor raises or skips it
            return SkippedSample(out.key, out.fields, out.reason, order)
        return (order, *out)


@dataclass
class _Strict:
    """A decoder that raises where it would yield a :class:`SkippedSample` (plain ``samples()``)."""

    decode: Callable

    def __call__(self, sample: Mapping[str, Any]):
        out = self.decode(sample)
        if isinstance(out, SkippedSample):
            raise DatasetError(out.reason)
        return out


@dataclass
class _SampleDecoder:
    """Turns a raw webdataset sample into a :data:`SampleTuple` (picklable for workers).

    The metadata is read and checked first; an image that then fails to decode gives a
    :class:`SkippedSample` (with the sample's field values), which only the extractor
    under ``--skip_bad_samples`` drops; everywhere else it is the same one-line error.
    """

    schema: GroupSchema
    transform: Callable | None

    def __call__(self, sample: Mapping[str, Any]) -> tuple[str, torch.Tensor, torch.Tensor] | SkippedSample:
        key = sample["__key__"]
        where = f"{sample.get('__url__', '?')}: sample {key!r}: "
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
            raise DatasetError(f"{where}no image entry (expected one of {IMAGE_EXTENSIONS})")
        if "json" not in sample:
            raise DatasetError(f"{where}no json entry with the group metadata")
        try:
            meta = json.loads(sample["json"])
            values = [int(meta[name]) for name in self.schema.field_names]
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{where}bad metadata json ({type(exc).__name__}: {exc})") from None
        self.schema.validate_values(np.asarray([values]), where=where)
        try:
            image = Image.open(io.BytesIO(sample[image_ext]))
            image.load()
        except Exception as exc:  # noqa: BLE001 - reported with the sample named (or skipped on request)
            detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))  # PIL names the buffer
            return SkippedSample(key, tuple(values), f"{where}undecodable image ({type(exc).__name__}: {detail})")
        mask = None
        if "mask.png" in sample and wants_sample(self.transform):  # decoded only for view/region transforms
            try:
                mask = Image.open(io.BytesIO(sample["mask.png"])).convert("L")
            except Exception as exc:  # noqa: BLE001 - re-raised with the sample named
                raise DatasetError(f"{where}undecodable mask ({exc})") from None
        image_tensor = apply_transform(self.transform, key, image, meta, mask)
        import torch

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
        import webdataset as wds

        self._writer = wds.ShardWriter(str(split_dir / "%d.tar"), maxcount=max_count, verbose=0, mtime=0)
        self._values: list[list[int]] = []
        self._keys: set[str] = set()
        self._masks = 0
        self._json_keys: dict[str, int] = {}

    def write(
        self,
        key: str,
        image: Image.Image | EncodedImage,
        values: Mapping[str, int],
        extra: Mapping[str, Any] | None = None,
        mask: Image.Image | EncodedImage | None = None,
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
        image_ext, image_bytes = _encoded(image)
        sample = {
            "__key__": key,
            image_ext: image_bytes,
            "cls": str(row[self.schema.class_index]).encode(),
            "json": json.dumps(meta).encode(),
        }
        if mask is not None:
            sample["mask.png"] = _encoded(mask)[1]
            self._masks += 1
        for name in meta:
            self._json_keys[name] = self._json_keys.get(name, 0) + 1
        self._writer.write(sample)

    def annotations(self) -> dict[str, Any]:
        """What the split's samples carry besides the image: how many have a mask, and how many
        have each json key, so readers decide (``sample_annotations``) without reading a sample."""
        return {"samples": len(self._values), "masks": self._masks, "json_keys": dict(sorted(self._json_keys.items()))}

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


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes written as they are, under entry ``ext`` (png, jpg, jpeg or webp; masks: png).

    Lets ``export_wds`` copy a dataset's JPEGs instead of re-encoding them.
    """

    ext: str
    data: bytes


def _encoded(image: Image.Image | EncodedImage) -> tuple[str, bytes]:
    if isinstance(image, EncodedImage):
        return image.ext, image.data
    return "png", _png_bytes(image)


def write_grouped_dataset(
    root: str | os.PathLike,
    schema: GroupSchema,
    templates: Sequence[str],
    splits: Mapping[str, Iterable[tuple[str, Image.Image, Mapping[str, int], Mapping[str, Any] | None, Image.Image | None]]],
    extra_metadata: Mapping[str, Any] | None = None,
    max_count: int | Mapping[str, int] = 1000,
    progress: Callable[[Iterable, str], Iterable] | None = None,
    classnames: Sequence[str] | None = None,
    known_counts: Mapping[str, Sequence[int]] | None = None,
) -> GroupSchema:
    """Write a complete grouped-shard dataset into ``root``, atomically per file set.

    ``splits`` maps split names to iterables of ``(key, image, values, extra, mask)``
    (``image``/``mask``: PIL images, or :class:`EncodedImage` bytes written as they are).
    ``classnames`` (the zero-shot prompts' names; default: the class field's value names)
    go to ``classnames.txt``; ``known_counts`` are group counts of splits not written here
    (a source's train split), kept in ``groups.json`` for the train-weighted average.
    ``max_count`` is the samples per shard, one number or one per split.  Everything is staged in a temporary directory beside ``root`` and moved into place
    at the end, ``groups.json`` last, so an interrupted run leaves no dataset that
    looks complete.  Returns the schema with the measured per-split counts.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        counts, annotations = {}, {}
        for split, items in splits.items():
            per_shard = max_count[split] if isinstance(max_count, Mapping) else max_count
            writer = GroupedShardWriter(stage / split, schema, max_count=per_shard)
            iterable = progress(items, split) if progress else items
            for key, image, values, extra, mask in iterable:
                writer.write(key, image, values, extra, mask)
            counts[split] = writer.close()
            annotations[split] = writer.annotations()
        counts = {**{k: tuple(v) for k, v in (known_counts or {}).items() if k not in counts}, **counts}
        final = GroupSchema(schema.fields, schema.class_field, dict(schema.groupings), counts)
        (stage / CLASSNAMES_FILE).write_text("\n".join(classnames or schema.classnames) + "\n")
        (stage / TEMPLATES_FILE).write_text("\n".join(templates) + "\n")
        metadata = {**(extra_metadata or {}), ANNOTATIONS_KEY: annotations}
        (stage / GROUPS_FILE).write_text(json.dumps(final.to_json(metadata), indent=1))
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
