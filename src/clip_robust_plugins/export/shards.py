"""``clip_benchmark_robust export_wds``: any registered dataset -> grouped WebDataset shards.

The output is the layout of :mod:`clip_robust_plugins.datasets.wds` (a superset of
clip_benchmark's ``wds/``), so both ``clip_benchmark eval --dataset wds/NAME`` and our
``eval`` read it, and ``groups.json`` carries the fields, value names and per-split
group counts (the train counts too when only val/test are exported), plus the source
dataset's name, plugin and options under ``source``.

Determinism: samples are written in the dataset's own order, which does not depend on
the number of workers, and tar members carry a fixed mtime, so the shards are
byte-identical across runs and ``--num_workers``.  Parallelism:

- map-style datasets (all file readers): DataLoader workers read and encode samples;
  the loader hands batches back in index order;
- iterable datasets (grouped shards): read in this process, encoded by a process pool
  whose ``imap`` keeps the input order.

Images of file readers are copied as they are when they are JPEG, PNG or WebP (no
re-encoding: the exported pixels are the original's), after a full decode that proves
them readable; other formats and decoded samples are written as PNG.  A bad sample
stops the export with a one-line error naming it, and nothing is moved into place.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..datasets.base import DatasetError, RobustDataset, SampleImage
from ..datasets.files import FileRow
from ..datasets.wds import EncodedImage, write_grouped_dataset
from ..groups import GROUPS_FILE, GroupSchema, GroupSchemaError

ROBUST_PREFIX = "robust/"
#: PIL formats copied byte for byte, and the shard entry they go under
COPYABLE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
#: samples per DataLoader batch (amortises inter-process transfer; order is unaffected)
BATCH = 16


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------- encoded samples
@dataclass(frozen=True)
class Encoded:
    """One sample ready for the shard writer."""

    key: str
    image: EncodedImage
    values: tuple[int, ...]
    extra: Mapping[str, Any]
    mask: EncodedImage | None = None


@dataclass(frozen=True)
class Failed:
    """A bad sample found in a worker, carried back as a value (a worker's exception
    would reach us as DataLoader's multi-line wrapper, losing the one-line message)."""

    message: str


def _png(image: Image.Image) -> EncodedImage:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return EncodedImage("png", buf.getvalue())


def _jsonable(extra: Mapping[str, Any], key: str) -> dict[str, Any]:
    def convert(value):
        if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
            return value.tolist()
        raise TypeError(f"{type(value).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(dict(extra), default=convert))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"sample {key!r}: metadata extras cannot be written as JSON ({exc})") from None


def encode_file_row(row: FileRow) -> Encoded | Failed:
    """A file reader's row: the original bytes when they decode and are JPEG/PNG/WebP, else PNG."""
    try:
        with open(row.path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return Failed(f"{row.path}: image file not readable (sample {row.key!r}, {row.where}): {exc.strerror or exc}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            ext = COPYABLE.get(image.format or "")
            encoded = EncodedImage(ext, data) if ext else _png(image.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; reported naming the file
        return Failed(f"{row.path}: unreadable image (sample {row.key!r}): {type(exc).__name__}: {exc}")
    return Encoded(row.key, encoded, tuple(row.values), dict(row.extra))


class _FileRows(torch.utils.data.Dataset):
    def __init__(self, rows: Sequence[FileRow]):
        self.rows = tuple(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Encoded | Failed:
        return encode_file_row(self.rows[index])


class CaptureSample:
    """A sample transform that hands back the whole decoded sample (image, metadata, mask)."""

    wants_sample = True

    def __call__(self, sample: SampleImage) -> SampleImage:
        return sample


def encode_sample(item: tuple[str, SampleImage, torch.Tensor], field_names: Sequence[str]) -> Encoded:
    """A decoded sample of any reader, as PNG image (and PNG mask) plus its non-field metadata."""
    key, sample, fields = item
    if isinstance(sample, Image.Image):  # a reader that calls the transform directly, not via apply_transform
        sample = SampleImage(key, sample.convert("RGB"))
    extra = _jsonable({k: v for k, v in sample.meta.items() if k not in field_names}, key)
    mask = _png(sample.mask) if sample.mask is not None else None
    return Encoded(key, _png(sample.image), tuple(int(v) for v in fields.tolist()), extra, mask)


class _EncodedSamples(torch.utils.data.Dataset):
    """A map-style dataset's samples, encoded in the worker; bad samples become :class:`Failed`."""

    def __init__(self, data: torch.utils.data.Dataset, field_names: Sequence[str]):
        self.data = data
        self.field_names = tuple(field_names)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Encoded | Failed:
        try:
            return encode_sample(self.data[index], self.field_names)
        except (DatasetError, GroupSchemaError) as exc:
            return Failed(str(exc))


def _as_list(batch):
    return list(batch)


def _encode_for_pool(args: tuple[tuple[str, SampleImage, torch.Tensor], tuple[str, ...]]) -> Encoded | Failed:
    item, field_names = args
    try:
        return encode_sample(item, field_names)
    except (DatasetError, GroupSchemaError) as exc:
        return Failed(str(exc))


def encoded_samples(dataset: RobustDataset, split: str, workers: int) -> Iterator[Encoded | Failed]:
    """Every sample of ``split`` encoded, in the dataset's order, with ``workers`` processes."""
    field_names = dataset.schema.field_names
    rows = dataset.file_rows(split)
    if rows is not None:
        mapped: torch.utils.data.Dataset | None = _FileRows(rows)
    else:
        data = dataset.samples(split, CaptureSample())
        mapped = None if isinstance(data, torch.utils.data.IterableDataset) else _EncodedSamples(data, field_names)
    if mapped is not None:
        loader = torch.utils.data.DataLoader(
            mapped, batch_size=BATCH, shuffle=False, num_workers=workers if workers > 1 else 0, collate_fn=_as_list
        )
        for batch in loader:
            yield from batch
        return
    items = ((item, field_names) for item in data)
    if workers <= 1:
        yield from map(_encode_for_pool, items)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(_encode_for_pool, items, chunksize=BATCH)


# ------------------------------------------------------------------------ export
def split_size(dataset: RobustDataset, split: str) -> int | None:
    """Samples in ``split`` as the dataset declares them (None when it cannot tell without reading)."""
    declared = dataset.schema.split_counts.get(split)
    if declared:
        return int(sum(declared))
    rows = dataset.file_rows(split)
    if rows is not None:
        return len(rows)
    return None


def shard_capacity(n: int | None, shard_size: int, min_shards: int) -> int:
    """Samples per shard so that ``n`` samples fill at least ``min(min_shards, n)`` shards."""
    if n is None:
        return shard_size
    return max(1, min(shard_size, -(-n // min_shards)))


def check_output_dir(output_dir: Path, source_root: Path) -> None:
    """Refuse to write where existing files could be replaced: only a new or empty
    directory, or one holding an earlier export (its split folders are ours to replace)."""
    out, src = output_dir.resolve(), source_root.resolve()
    if out == src or out in src.parents:
        raise DatasetError(f"{output_dir}: --output_dir must not be the dataset root or a folder above it")
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise DatasetError(f"{output_dir}: --output_dir is not a directory")
    entries = [p.name for p in output_dir.iterdir() if not p.name.startswith(".staging-")]
    if not entries:
        return
    groups = output_dir / GROUPS_FILE
    try:
        ours = groups.is_file() and "exporter" in json.loads(groups.read_text())
    except (json.JSONDecodeError, TypeError):
        ours = False
    if not ours:
        raise DatasetError(
            f"{output_dir}: not empty and not an earlier export ({', '.join(sorted(entries)[:3])}); "
            "choose a new or empty --output_dir"
        )


def export_wds(
    dataset: RobustDataset,
    output_dir: str | os.PathLike,
    *,
    splits: Sequence[str] | None = None,
    shard_size: int = 1000,
    min_shards: int = 8,
    num_workers: int | None = None,
    source: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> GroupSchema:
    """Write ``dataset``'s ``splits`` (default: all) as grouped shards into ``output_dir``.

    Each split is spread over at least ``min_shards`` shards (fewer only when it has fewer
    samples) of at most ``shard_size`` samples: clip_benchmark's wds reader gives each
    DataLoader worker whole shards and fails when a worker gets none.  Returns the written
    schema.  The counts written must equal the counts the dataset declares (when it
    declares them): a mismatch is an error before anything is moved.
    """
    from tqdm.auto import tqdm

    available = dataset.splits()
    splits = list(dict.fromkeys(splits or available))
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise DatasetError(f"no split {unknown[0]!r} to export (splits: {list(available)})")
    if shard_size < 1 or min_shards < 1:
        raise DatasetError(f"--shard_size and --min_shards must be at least 1, got {shard_size} and {min_shards}")
    workers = default_workers() if num_workers is None else max(0, num_workers)
    schema = dataset.schema

    def items(split: str):
        declared = schema.split_counts.get(split)
        bar = tqdm(
            total=sum(declared) if declared else None, desc=f"export {split}", unit="img", file=sys.stderr,
            disable=not progress,
        )
        values = []
        with bar:
            for sample in encoded_samples(dataset, split, workers):
                if isinstance(sample, Failed):
                    raise DatasetError(sample.message)
                values.append(sample.values)
                bar.update(1)
                yield sample.key, sample.image, dict(zip(schema.field_names, sample.values)), sample.extra, sample.mask
        if declared is not None and values:
            written = schema.full_counts(np.asarray(values, dtype=np.int64))
            if tuple(written) != tuple(declared):
                raise DatasetError(f"split {split!r}: read group counts {list(written)}, the dataset declares {list(declared)}")

    metadata = {
        "exporter": {"name": "clip_benchmark_robust export_wds", "version": __version__},
        "source": dict(source or {}),
    }
    per_shard = {split: shard_capacity(split_size(dataset, split), shard_size, min_shards) for split in splits}
    return write_grouped_dataset(
        output_dir,
        schema,
        dataset.templates,
        {split: items(split) for split in splits},
        extra_metadata=metadata,
        max_count=per_shard,
        classnames=dataset.classnames,
        known_counts={k: v for k, v in schema.split_counts.items() if k not in splits},
    )


# ---------------------------------------------------------------------- command
def run_export(config: Any, ctx: Any) -> int:
    """Load ``config.dataset`` through its plugin and export it (the ``export_wds`` command:
    ``config`` its :class:`~.command.ExportConfig`, ``ctx`` its command context)."""
    name = config.dataset[len(ROBUST_PREFIX):] if config.dataset.startswith(ROBUST_PREFIX) else config.dataset
    ctx.registry.dataset(name)  # an unknown name: one line listing the registered datasets
    owner = ctx.registry.owner("datasets", name)
    options = ctx.flag_values("datasets", name)
    check_output_dir(Path(config.output_dir), Path(config.dataset_root))
    dataset = ctx.load_dataset(f"{ROBUST_PREFIX}{name}", config.dataset_root)
    source = {"dataset": f"{ROBUST_PREFIX}{name}", "plugin": owner, "options": _plain(options)}
    splits = list(config.splits) if config.splits else None
    final = export_wds(
        dataset, config.output_dir, splits=splits, shard_size=config.shard_size, min_shards=config.min_shards,
        num_workers=config.num_workers, source=source, progress=not config.no_progress,
    )
    written = splits or list(dataset.splits())
    summary = ", ".join(f"{split} {sum(final.split_counts[split])}" for split in written)
    print(f"export_wds: wrote {summary} samples to {config.output_dir} (read it with --dataset wds/{name})",
          file=sys.stderr)
    return 0


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(options), default=str))
