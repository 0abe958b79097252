"""Which per-sample annotations (foreground masks, object boxes) a split has, decided without
decoding an image, so ``--seraser_views auto`` can pick its provider and ``masks``/``boxes``
can be refused in ``check`` before the model is built or any feature extracted.

Every dataset answers ``sample_annotations(split)`` (part of the dataset base class; a
third-party reader overrides it): file readers from their parsed rows (no masks; a box is
``FileRow.extra["box"]``), grouped shards from the ``annotations`` record of ``groups.json``
or, for local shards without it, from the tar headers; clip_benchmark's class-only shards
carry neither; None (remote shards, readers that do not say): unknown.  ``auto`` then takes
the no-segmenter views; an explicit ``masks``/``boxes`` runs and fails per sample if one lacks it.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """``{annotation: True (every sample has it) | False (some sample lacks it) | None (unknown)}``,
    from the dataset's ``sample_annotations`` (part of every dataset; None there: all unknown)."""
    got = dataset.sample_annotations(split) or {}
    return {a: got.get(a) for a in wanted}


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
