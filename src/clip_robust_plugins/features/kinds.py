"""Feature sets and kinds: what the extractor produces and how methods name what they read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..datasets.base import DatasetError, SampleImage
from ..groups import DEFAULT_GROUPING, GroupSchema


@dataclass(frozen=True)
class FeatureSet:
    """Features of one split, row-aligned with sample keys and metadata field values."""

    keys: tuple[str, ...]
    features: torch.Tensor  # (N, D) float32
    fields: torch.Tensor  # (N, n_fields) int64
    schema: GroupSchema
    kind: str = "image"
    cache_path: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def y(self) -> torch.Tensor:
        return self.fields[:, self.schema.class_index]

    def group_ids(self, grouping: str = DEFAULT_GROUPING) -> torch.Tensor:
        return torch.from_numpy(self.schema.group_ids(self.fields.numpy(), grouping))


@dataclass(frozen=True)
class ImageSetKind:
    """A feature kind made of several images derived from each sample (views, regions).

    ``derive(sample)`` gets a :class:`~clip_robust_plugins.datasets.base.SampleImage`
    (image, metadata, mask) and returns exactly ``count`` PIL images; each goes through
    the model's own preprocessing and image tower, and the normalised embeddings are
    stored as (N, count, D).  ``name`` and ``config`` enter the cache key, so change
    ``config`` whenever the derived images change.  ``derive`` must be picklable
    (a module-level function or class instance) for DataLoader workers.
    """

    name: str
    derive: Callable[[SampleImage], Sequence[Any]]
    count: int
    config: str = ""

    def describe(self) -> str:
        """What enters the cache key: name, config and count."""
        return f"{self.name}[{self.config}]x{self.count}"


class _DerivedImages:
    """The sample transform behind an :class:`ImageSetKind`: derive, preprocess, stack."""

    wants_sample = True

    def __init__(self, kind: ImageSetKind, transform: Callable):
        self.kind = kind
        self.transform = transform

    def __call__(self, sample: SampleImage) -> torch.Tensor:
        images = list(self.kind.derive(sample))
        if len(images) != self.kind.count:
            raise DatasetError(
                f"sample {sample.key!r}: {self.kind.name} made {len(images)} images, expected {self.kind.count}"
            )
        return torch.stack([self.transform(image) for image in images])

    def __repr__(self) -> str:
        return f"{self.kind.describe()}({self.transform!r})"


FeatureKind = str | ImageSetKind


def kind_name(kind: FeatureKind) -> str:
    """The name a feature kind is stored and looked up under."""
    return kind.name if isinstance(kind, ImageSetKind) else kind
