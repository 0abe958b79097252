"""The shared base of the readers of published datasets: image files plus metadata tables.

A reader (``robust/waterbirds``, ``robust/celeba``, ``robust/subpop``,
``robust/imagefolder``) parses the dataset's own metadata into :class:`FileRow` records
and hands them to :class:`FileDataset`, which does everything else the same way for all:

- rows are sorted by key within each split, so the order never depends on the
  metadata file's row order or on ``os.listdir``;
- keys are derived from the image path (:func:`key_from_path`): no dots or slashes
  (WebDataset splits names at the first dot), reversible, so two files never share one;
- duplicate keys, values out of range, missing images and unreadable images are
  :class:`~clip_robust_plugins.datasets.base.DatasetError` naming the file and the row;
- per-split group counts go into the schema's ``split_counts`` (the train-weighted
  average needs the train counts even when only the test split is evaluated);
- :meth:`FileDataset.samples` is a plain map-style torch dataset, so DataLoader workers
  and data-parallel ranks can split it by index.

The fingerprint (part of the feature-cache key) hashes the metadata files, the row list
and each image file's size and modification time, read once per split with the
existence check, so a replaced image invalidates cached features.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..groups import GroupSchema
from .bad_samples import SkippedSample
from .base import DatasetError, RobustDataset, apply_transform, order_key

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the split codes of group_DRO, DFR, WILDS and SubpopBench metadata (0/1/2)
SPLIT_CODES = {0: "train", 1: "val", 2: "test"}
#: the order :meth:`FileDataset.splits` lists the usual splits in (others follow, sorted)
SPLIT_ORDER = ("train", "val", "test")


def key_from_path(path: str) -> str:
    """The sample key of an image path (relative to the dataset's image root).

    The extension is dropped and everything but letters, digits and ``_-~`` is
    percent-escaped (``.`` as ``%2E``, ``/`` as ``%2F``), so keys stay readable for the
    usual names (``000001``), never contain dots or slashes, and distinct paths give
    distinct keys (apart from the dropped extension, which a duplicate-key error reports).
    """
    stem, _ = posixpath.splitext(path.replace(os.sep, "/"))
    if _PLAIN_KEY.fullmatch(stem):  # the common case (CelebA's 202k ids), without quote()'s cost
        return stem
    return urllib.parse.quote(stem, safe="").replace(".", "%2E")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_~-]+")


@dataclass(frozen=True)
class FileRow:
    """One sample of a file-backed dataset.

    ``path`` is the image file (a string: readers make hundreds of thousands of rows, and
    ``pathlib`` objects would dominate their load time); ``values`` are the metadata
    field values in schema field order; ``extra`` holds
    JSON-able per-sample extras (kept in exported shards); ``where`` says where the row
    came from (``metadata.csv line 12``), for error messages.
    """

    key: str
    path: str
    values: tuple[int, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""


class FileDataset(RobustDataset):
    """A group-annotated dataset of image files, its rows already parsed by a reader.

    ``schema`` gives the fields and value names (its ``split_counts`` are replaced by the
    counts of ``rows``); ``rows`` maps split names to rows in any order; ``metadata_files``
    are hashed into the fingerprint; ``options`` (the reader's settings) are recorded in
    :meth:`describe` and the fingerprint.
    """

    def __init__(
        self,
        *,
        name: str,
        root: str | os.PathLike,
        schema: GroupSchema,
        classnames: Sequence[str],
        templates: Sequence[str],
        rows: Mapping[str, Iterable[FileRow]],
        metadata_files: Sequence[str | os.PathLike] = (),
        options: Mapping[str, Any] | None = None,
    ):
        self.name = name
        self.root = Path(root)
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.metadata_files = [Path(p) for p in metadata_files]
        self.options = dict(options or {})
        if len(self.classnames) != len(schema.classnames):
            raise DatasetError(
                f"robust/{name}: {len(self.classnames)} class names for {len(schema.classnames)} classes"
            )
        self._rows: dict[str, tuple[FileRow, ...]] = {}
        counts: dict[str, tuple[int, ...]] = {}
        for split, split_rows in rows.items():
            ordered = tuple(sorted(split_rows, key=lambda r: r.key))
            if not ordered:
                continue
            _check_rows(ordered, schema, name, split)
            self._rows[split] = ordered
            counts[split] = schema.full_counts(np.asarray([r.values for r in ordered], dtype=np.int64))
        if not self._rows:
            raise DatasetError(f"{self.root}: robust/{name} found no samples")
        self.schema = GroupSchema(schema.fields, schema.class_field, dict(schema.groupings), counts)
        self._file_stats: dict[str, list[tuple[int, int]]] = {}
        self._metadata_digest: str | None = None

    # ------------------------------------------------------------------ interface
    def splits(self) -> tuple[str, ...]:
        known = [s for s in SPLIT_ORDER if s in self._rows]
        return tuple(known + sorted(s for s in self._rows if s not in SPLIT_ORDER))

    def rows(self, split: str) -> tuple[FileRow, ...]:
        """The rows of ``split`` in sample order (sorted by key)."""
        if split not in self._rows:
            raise DatasetError(f"robust/{self.name} has no split {split!r} (splits: {list(self.splits())})")
        return self._rows[split]

    def file_rows(self, split: str) -> tuple[FileRow, ...]:
        return self.rows(split)

    def samples(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        return FileSamples(self.rows(split), self.schema.field_names, transform)

    def ordered_samples(
        self, split: str, transform: Callable | None, rank: int = 0, world_size: int = 1
    ) -> torch.utils.data.Dataset:
        """Rows ``rank, rank + world_size, ...`` tagged with their index; an image that does not
        decode gives a :class:`~.bad_samples.SkippedSample` (its one-line reason names the file),
        which the extractor raises, or drops under ``--skip_bad_samples``."""
        return _OrderedFileSamples(self.rows(split), self.schema.field_names, transform, rank, world_size)

    def fingerprint(self, split: str) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"reader": self.name, "options": self.options}, sort_keys=True, default=str).encode())
        h.update(self._hash_metadata().encode())
        h.update(split.encode())
        for row, (size, mtime) in zip(self.rows(split), self.check_files(split)):
            h.update(json.dumps([row.key, str(row.path), row.values, size, mtime], default=str).encode())
        return h.hexdigest()[:16]

    def sample_annotations(self, split: str) -> dict[str, Any] | None:
        """From the parsed rows (in memory): file readers give no masks; a box is ``extra["box"]``."""
        rows = self.rows(split)
        keys: dict[str, int] = {name: len(rows) for name in self.schema.field_names}
        for row in rows:
            for name in row.extra:
                keys[name] = keys.get(name, 0) + 1
        boxed = sum(row.extra.get("box") is not None for row in rows)
        return {"mask": False, "box": boxed == len(rows), "json_keys": dict(sorted(keys.items())), "samples": len(rows)}

    def describe(self) -> dict[str, Any]:
        return {
            "type": "files",
            "reader": self.name,
            "root": str(self.root),
            "metadata_files": [str(p) for p in self.metadata_files],
            "options": self.options,
        }

    # -------------------------------------------------------------------- checks
    def check_files(self, split: str) -> list[tuple[int, int]]:
        """(size, mtime_ns) of every image of ``split``; a missing image is an error naming it."""
        if split not in self._file_stats:
            stats = []
            for row in self.rows(split):
                try:
                    st = os.stat(row.path)
                except OSError as exc:
                    raise DatasetError(
                        f"{row.path}: image file {'not found' if isinstance(exc, FileNotFoundError) else 'unreadable'} "
                        f"(sample {row.key!r}, {row.where})"
                    ) from None
                stats.append((st.st_size, st.st_mtime_ns))
            self._file_stats[split] = stats
        return self._file_stats[split]

    def _hash_metadata(self) -> str:
        if self._metadata_digest is None:
            h = hashlib.sha256()
            for path in self.metadata_files:
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            self._metadata_digest = h.hexdigest()
        return self._metadata_digest


def _check_rows(rows: Sequence[FileRow], schema: GroupSchema, name: str, split: str) -> None:
    """Duplicate keys and out-of-range values, each reported with the row it came from."""
    for prev, row in zip(rows, rows[1:]):
        if prev.key == row.key:
            raise DatasetError(
                f"robust/{name} split {split!r}: duplicate sample key {row.key!r} ({prev.where}: {prev.path}; "
                f"{row.where}: {row.path})"
            )
    n_fields = len(schema.fields)
    for row in rows:
        if not row.key:
            raise DatasetError(f"{row.where}: empty sample key (an empty file name?)")
        if len(row.values) != n_fields:
            raise DatasetError(f"{row.where}: {len(row.values)} metadata values, expected {n_fields}")
        for f, v in zip(schema.fields, row.values):
            if not 0 <= v < f.size:
                raise DatasetError(f"{row.where}: field {f.name!r} value {v} is out of range 0..{f.size - 1}")


class FileSamples:
    """Map-style samples of one split (a DataLoader dataset): ``(key, transformed image, int64 field values)``.

    Picklable (DataLoader workers); images are opened only in ``__getitem__``.
    """

    def __init__(self, rows: Sequence[FileRow], field_names: Sequence[str], transform: Callable | None):
        self.rows = tuple(rows)
        self.field_names = tuple(field_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[str, Any, torch.Tensor]:
        import torch

        row = self.rows[index]
        image = open_image(row)
        meta = {**dict(zip(self.field_names, row.values)), **row.extra}
        return row.key, apply_transform(self.transform, row.key, image, meta), torch.tensor(row.values, dtype=torch.int64)


class _OrderedFileSamples(FileSamples):
    """Part ``rank`` of ``world_size`` of a split: ``(order, key, image, fields)`` or a SkippedSample."""

    def __init__(self, rows: Sequence[FileRow], field_names: Sequence[str], transform: Callable | None, rank: int, world_size: int):
        super().__init__(rows, field_names, transform)
        self.indices = range(rank, len(self.rows), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        index = self.indices[i]
        row = self.rows[index]
        order = order_key(0, index)
        try:
            image = open_image(row)
        except DatasetError as exc:
            return SkippedSample(row.key, tuple(row.values), str(exc), order)
        meta = {**dict(zip(self.field_names, row.values)), **row.extra}
        fields = torch.tensor(row.values, dtype=torch.int64)
        return order, row.key, apply_transform(self.transform, row.key, image, meta), fields


def open_image(row: FileRow) -> Image.Image:
    """The decoded image of ``row``; a missing or undecodable file is an error naming it."""
    try:
        image = Image.open(row.path)
        image.load()
    except FileNotFoundError:
        raise DatasetError(f"{row.path}: image file not found (sample {row.key!r}, {row.where})") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; re-raised naming the file
        raise DatasetError(f"{row.path}: unreadable image (sample {row.key!r}): {type(exc).__name__}: {exc}") from None
    return image


# ---------------------------------------------------------------- parsing helpers
def resolve_under(root: Path, path: str | os.PathLike) -> Path:
    """``path`` as given when absolute, else relative to the dataset root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def read_text(path: Path, what: str = "metadata file") -> str:
    """A text file's content: UTF-8 (a BOM is dropped); a file that is not UTF-8 is read as
    Windows-1252 (what spreadsheet programs on Windows write; Latin-1 for its few undefined
    bytes), with a note on stderr naming it.  Line endings are left to the caller."""
    if not path.is_file():
        raise DatasetError(f"{path}: {what} {'is not a file' if path.exists() else 'not found'}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        try:
            text, encoding = data.decode("cp1252"), "Windows-1252"
        except UnicodeDecodeError:
            text, encoding = data.decode("latin-1"), "Latin-1"
        print(f"note: {path} is not UTF-8 (byte {exc.start}); read as {encoding}", file=sys.stderr)
        return text


def read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV file's header and ``(line number, row)`` pairs; missing file or columns are errors.

    Extra columns (e.g. pandas' unnamed index column) are allowed and ignored; a BOM, CRLF
    line endings, blank lines, quoted cells with commas and non-UTF-8 text (:func:`read_text`)
    are read as spreadsheet programs write them.  Header names are stripped of spaces.
    """
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing} (found: {header})")
    named = [c for c in header if c]  # unnamed columns (pandas' index, trailing commas) are ignored
    if len(set(named)) != len(named):
        dup = next(c for c in named if named.count(c) > 1)
        raise DatasetError(f"{path}: column {dup!r} appears twice in the header")
    reader.fieldnames = header
    rows = []
    try:
        for row in reader:
            if None in row:  # more cells than header columns
                raise DatasetError(f"{path} line {reader.line_num}: more values than header columns")
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise DatasetError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    return header, rows


def parse_int(text: str | None, where: str, column: str, allowed: Sequence[int] | None = None) -> int:
    """An integer cell; ``allowed`` restricts the values (the message lists them)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise DatasetError(f"{where}: column {column!r}: {text!r} is not an integer") from None
    if allowed is not None and value not in allowed:
        raise DatasetError(f"{where}: column {column!r}: value {value} is out of range (expected one of {list(allowed)})")
    return value


def split_name(text: str, where: str, column: str = "split") -> str:
    """A split cell: 0/1/2 (train/val/test) as in group_DRO and SubpopBench, or a split name."""
    text = str(text).strip()
    try:
        code = int(text)
    except ValueError:
        if not text:
            raise DatasetError(f"{where}: column {column!r} is empty") from None
        return text
    if code not in SPLIT_CODES:
        raise DatasetError(f"{where}: column {column!r}: split code {code} is not one of 0/1/2 (train/val/test)")
    return SPLIT_CODES[code]
