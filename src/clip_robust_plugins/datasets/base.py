"""The dataset interface every reader implements.

A :class:`RobustDataset` is a set of named splits whose samples carry group metadata.
``samples(split, transform)`` returns a torch dataset (usually an ``IterableDataset``
streaming from shards) yielding :data:`SampleTuple` items, which the default collate
turns into ``(keys, images, fields)`` batches.  The engine only ever sees this
interface, so a third-party reader plugs in by returning one from its ``DatasetSpec.load``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from ..groups import GroupSchema

#: (sample key, transformed image tensor, field values as int64 tensor in schema order)
SampleTuple = tuple[str, torch.Tensor, torch.Tensor]


class DatasetError(ValueError):
    """Bad dataset input: the message names the file (and the sample key where known)."""


class RobustDataset(ABC):
    """A group-annotated dataset with class names, prompt templates and splits."""

    #: the metadata fields, groupings and per-split counts
    schema: GroupSchema
    #: prompt templates using ``{c}`` (clip_benchmark convention)
    templates: list[str]
    #: class names used to build the zero-shot head (defaults to the class field's values)
    classnames: list[str]

    @abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The split names this dataset has, e.g. ``("train", "val", "test")``."""

    @abstractmethod
    def samples(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        """A torch dataset of :data:`SampleTuple` for ``split``, in a deterministic order."""

    @abstractmethod
    def fingerprint(self, split: str) -> str:
        """A string that changes whenever the data of ``split`` changes (part of cache keys)."""

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the results JSON."""
        return {"type": type(self).__name__}
