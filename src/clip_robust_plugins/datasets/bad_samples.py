"""Undecodable samples (``--skip_bad_samples``) and the checks that keep bad input from passing silently.

A reader that meets an image it cannot decode yields a :class:`SkippedSample` in place of
the sample (from ``ordered_samples``; its metadata is already read and checked, so only
the image is bad).  The extractor's DataLoader uses :func:`collate_samples`, which sets
such items aside; the extractor then raises the item's one-line reason, or, only when
the user passed ``--skip_bad_samples``, drops the sample, warns on stderr, records its key
in the results JSON (``robust.skipped_samples``) and does not cache that split's features.
Nothing else is ever skipped: a corrupt or truncated tar, bad metadata, a label out of
range or a duplicate key stays an error.

:func:`check_declared_counts` compares the samples a split actually yielded with the
per-group counts its ``groups.json`` declares: a shard truncated at a member boundary
(which ``tarfile`` reads as a shorter, valid archive) or a group that lost its samples
is an error rather than a quietly smaller evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..groups import DEFAULT_GROUPING, GroupSchema
from .base import DatasetError, RobustDataset

if TYPE_CHECKING:  # pragma: no cover
    import torch

SKIP_FLAG = "--skip_bad_samples"


@dataclass(frozen=True)
class SkippedSample:
    """An item yielded in place of a sample whose image could not be decoded.

    ``reason`` is the one-line error (naming the shard and the key); ``fields`` are the
    sample's metadata values in schema order (its group is known even without the image);
    ``order`` is the (shard, position) order key the extractor sorts by.
    """

    key: str
    fields: tuple[int, ...]
    reason: str
    order: torch.Tensor | None = None


def collate_samples(items: Sequence) -> tuple[object | None, list[SkippedSample]]:
    """DataLoader ``collate_fn``: (default-collated good items or None, skipped items)."""
    import torch

    skipped = [item for item in items if isinstance(item, SkippedSample)]
    kept = [item for item in items if not isinstance(item, SkippedSample)]
    batch = torch.utils.data.default_collate(kept) if kept else None
    return batch, skipped


def dataset_location(dataset: RobustDataset) -> str:
    """The root (directory or URL) a dataset was read from, for messages."""
    return str(dataset.describe().get("root") or type(dataset).__name__)


def check_declared_counts(
    dataset: RobustDataset, split: str, fields: np.ndarray, skipped: Sequence[SkippedSample] = ()
) -> None:
    """Raise unless ``split`` yielded exactly the per-group counts the dataset declares.

    ``fields`` are the values of the samples read; skipped samples count as read (their
    metadata was valid).  Datasets that declare no counts for the split are not checked.
    """
    schema = dataset.schema
    declared = schema.split_counts.get(split)
    if not declared:
        return
    rows = [np.asarray(fields, dtype=np.int64).reshape(-1, len(schema.fields))]
    if skipped:
        rows.append(np.asarray([s.fields for s in skipped], dtype=np.int64))
    found = schema.full_counts(np.concatenate(rows))
    if tuple(found) == tuple(declared):
        return
    names = _full_group_names(schema)
    i = next(i for i, (a, b) in enumerate(zip(found, declared)) if a != b)
    raise DatasetError(
        f"{dataset_location(dataset)}: split {split!r} holds {found[i]} samples of {names[i]}, but its groups.json "
        f"declares {declared[i]} ({sum(found)} read, {sum(declared)} declared; a truncated shard or a damaged dataset?)"
    )


def _full_group_names(schema: GroupSchema) -> list[str]:
    full = GroupSchema(schema.fields, schema.class_field, {DEFAULT_GROUPING: schema.field_names})
    return full.group_names()


def skipped_summary(skipped: Sequence[SkippedSample]) -> dict[str, object]:
    """What the results JSON records for one split: ``{"count": n, "keys": [...]}``."""
    return {"count": len(skipped), "keys": [s.key for s in skipped]}
