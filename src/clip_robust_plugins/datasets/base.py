"""The dataset interface every reader implements.

A :class:`RobustDataset` is a set of named splits whose samples carry group metadata.
``samples(split, transform)`` returns a torch dataset (usually an ``IterableDataset``
streaming from shards) yielding :data:`SampleTuple` items, which the default collate
turns into ``(keys, images, fields)`` batches.  The engine only ever sees this
interface, so a third-party reader plugs in by returning one from its ``DatasetSpec.load``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..groups import GroupSchema
from .order import order_key

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: (sample key, transformed image tensor, field values as int64 tensor in schema order)
SampleTuple = tuple[str, "torch.Tensor", "torch.Tensor"]


class DatasetError(ValueError):
    """Bad dataset input: the message names the file (and the sample key where known)."""


@dataclass(frozen=True)
class SampleImage:
    """One decoded sample as a *sample transform* sees it (views, regions).

    ``meta`` is the sample's metadata (field values by name plus extras such as
    ``box``: ``[x0, y0, x1, y1]`` in pixels of ``image``); ``mask`` is the dataset's
    foreground mask (mode ``L``, same size as ``image``) when it has one.
    """

    key: str
    image: Image.Image
    meta: Mapping[str, Any] = field(default_factory=dict)
    mask: Image.Image | None = None


def wants_sample(transform: Callable | None) -> bool:
    """True for transforms that take a whole :class:`SampleImage` instead of a PIL image.

    Such transforms set ``wants_sample = True``; they compute several images per sample
    (foreground/background views, region crops) and need the mask and boxes too.
    """
    return bool(getattr(transform, "wants_sample", False))


def apply_transform(
    transform: Callable | None,
    key: str,
    image: Image.Image,
    meta: Mapping[str, Any] | None = None,
    mask: Image.Image | None = None,
) -> Any:
    """What every reader calls on a decoded image: plain transforms get the image,
    sample transforms (:func:`wants_sample`) get the whole :class:`SampleImage`."""
    if transform is None:
        return image
    if wants_sample(transform):
        return transform(SampleImage(key, image.convert("RGB"), dict(meta or {}), mask))
    return transform(image)


class RobustDataset(ABC):
    """A group-annotated dataset with class names, prompt templates and splits."""

    #: the metadata fields, groupings and per-split counts
    schema: GroupSchema
    #: prompt templates using ``{c}`` (clip_benchmark convention)
    templates: list[str]
    #: class names used to build the zero-shot head (defaults to the class field's values)
    classnames: list[str]
    #: False for data without group annotation (clip_benchmark's own shards): groups are
    #: then the classes, and mitigations that need group labels refuse to run
    has_group_labels: bool = True

    @abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The split names this dataset has, e.g. ``("train", "val", "test")``."""

    @abstractmethod
    def samples(self, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
        """A torch dataset of :data:`SampleTuple` for ``split``, in a deterministic order.

        Readers apply ``transform`` with :func:`apply_transform`, so transforms that want
        the whole sample (mask, box metadata) receive a :class:`SampleImage`.
        """

    @abstractmethod
    def fingerprint(self, split: str) -> str:
        """A string that changes whenever the data of ``split`` changes (part of cache keys)."""

    def ordered_samples(
        self, split: str, transform: Callable | None, rank: int = 0, world_size: int = 1
    ) -> torch.utils.data.Dataset:
        """Part ``rank`` of ``world_size`` of :meth:`samples`, each item prefixed by its order key.

        Items are ``(order, key, image, fields)`` with ``order`` an int64 tensor of two
        numbers; sorting all parts' items by ``order`` gives the order of :meth:`samples`.
        The extractor uses this for every pass, so the sample order never depends on the
        number of DataLoader workers or torchrun processes.  The default works for any
        reader: map-style datasets are strided by index; iterable ones are read in full
        by every worker and thinned (correct but wasteful: readers that can split their
        input, like grouped shards, override this).
        """
        import torch

        from .parts import EveryNth

        data = self.samples(split, transform)
        if isinstance(data, torch.utils.data.IterableDataset):
            return EveryNth(data, rank, world_size)
        return _IndexedPart(data, rank, world_size)

    def file_rows(self, split: str) -> Sequence[Any] | None:
        """The :class:`~clip_robust_plugins.readers.FileRow` records of a split read from image
        files (``export_wds`` then copies the files' bytes instead of re-encoding); None (the
        default) for other datasets."""
        return None

    def sample_annotations(self, split: str) -> dict[str, Any] | None:
        """What every sample of ``split`` carries besides its image, told without decoding one.

        ``{"mask": bool, "box": bool}`` (True: every sample has a foreground mask / an object
        box; False: some sample lacks it), optionally ``"json_keys": {key: samples having it}``
        and ``"samples": n``.  None (the default) means unknown: consumers (SEraser's
        ``--seraser_views auto``, RaVL's region metrics) then fall back to safe choices.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the results JSON."""
        return {"type": type(self).__name__}


class _IndexedPart:
    """Every ``world_size``-th item of a map-style dataset, starting at ``rank`` (a map-style
    dataset for DataLoader: ``__len__`` and ``__getitem__``)."""

    def __init__(self, data: torch.utils.data.Dataset, rank: int, world_size: int):
        self.data = data
        self.indices = range(rank, len(data), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        return (order_key(0, index), *self.data[index])
