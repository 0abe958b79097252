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


#: the key of the model's own view of the image in a :class:`SampleViews` item
WHOLE_IMAGE = "__image__"


class SampleViews:
    """The sample transform of one pass: from one decoded sample, the model's view of the
    whole image (when a plain kind needs it) and every image-set kind's derived images,
    preprocessed and stacked.  Runs in the DataLoader workers, so each image is decoded once
    per split however many kinds the run needs."""

    wants_sample = True

    def __init__(self, transform: Callable, image_sets: Sequence[ImageSetKind], whole_image: bool):
        self.transform = transform
        self.image_sets = tuple(image_sets)
        self.whole_image = whole_image

    def __call__(self, sample: SampleImage) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.whole_image:
            out[WHOLE_IMAGE] = self.transform(sample.image)
        for kind in self.image_sets:
            images = list(kind.derive(sample))
            if len(images) != kind.count:
                raise DatasetError(f"sample {sample.key!r}: {kind.name} made {len(images)} images, expected {kind.count}")
            out[kind.name] = torch.stack([self.transform(image) for image in images])
        return out

    def __repr__(self) -> str:
        return f"SampleViews({self.transform!r}, {[k.describe() for k in self.image_sets]}, whole={self.whole_image})"


FeatureKind = str | ImageSetKind


def kind_name(kind: FeatureKind) -> str:
    """The name a feature kind is stored and looked up under."""
    return kind.name if isinstance(kind, ImageSetKind) else kind
