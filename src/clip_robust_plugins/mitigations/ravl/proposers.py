"""Region proposers (quadrants, N x N grid, boxes from the sample json) and the cached region feature kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...datasets.base import DatasetError, SampleImage
from ...specs import Box


def grid_boxes(width: int, height: int, n: int) -> list[Box]:
    """An ``n`` x ``n`` grid of boxes, row by row (``n = 2``: the quadrants TL, TR, BL, BR)."""
    xs = [round(i * width / n) for i in range(n + 1)]
    ys = [round(j * height / n) for j in range(n + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(n) for i in range(n)]


class GridProposer:
    """``n`` x ``n`` equal boxes per image (``quadrants`` is ``n = 2``, RaVL's synthetic setting)."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"grid size must be at least 1, got {n}")
        self.n = n
        self.count = n * n
        self.config = f"grid{n}"

    def __call__(self, sample: SampleImage) -> list[Box]:
        return grid_boxes(sample.image.width, sample.image.height, self.n)


class BoxesProposer:
    """The boxes a dataset stores in each sample's metadata under ``key``, padded to ``count``.

    A value may be one box ``[x0, y0, x1, y1]`` or a list of them; fewer than ``count`` are
    padded by repeating the last one (marked invalid later), more are truncated.
    """

    def __init__(self, key: str, count: int):
        if count < 1:
            raise ValueError(f"--ravl_max_boxes must be at least 1, got {count}")
        self.key = key
        self.count = count
        self.config = f"boxes[{key}]x{count}"

    def __call__(self, sample: SampleImage) -> list[Box]:
        value = sample.meta.get(self.key)
        if value is None:
            raise DatasetError(f"sample {sample.key!r}: no {self.key!r} boxes in its metadata (region proposer 'boxes')")
        boxes = as_boxes(value)
        if boxes is None or not boxes:
            raise DatasetError(f"sample {sample.key!r}: metadata {self.key!r} is not a box or a list of boxes: {value!r}")
        boxes = boxes[: self.count]
        return boxes + [boxes[-1]] * (self.count - len(boxes))


def as_boxes(value: Any) -> list[Box] | None:
    """``[x0, y0, x1, y1]`` or a list of those as a list of int tuples (None if neither)."""
    try:
        if len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
            return [tuple(int(round(v)) for v in value)]
        if all(len(b) == 4 for b in value):
            return [tuple(int(round(v)) for v in b) for b in value]
    except TypeError:
        return None
    return None


def proposed_boxes(proposer: Callable, sample: SampleImage) -> tuple[list[Box], list[bool]]:
    """The proposer's boxes for ``sample``, checked, and which of them count (not a repeat of an earlier box)."""
    boxes = [tuple(int(v) for v in b) for b in proposer(sample)]
    count = getattr(proposer, "count", None)
    if count is not None and len(boxes) != count:
        raise DatasetError(f"sample {sample.key!r}: region proposer {proposer.config!r} gave {len(boxes)} boxes, "
                           f"expected {count}")
    w, h = sample.image.size
    for box in boxes:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise DatasetError(f"sample {sample.key!r}: region box {list(box)} is empty or outside the {w}x{h} image")
    seen: set[Box] = set()
    valid = []
    for box in boxes:
        valid.append(box not in seen)
        seen.add(box)
    return boxes, valid


class RegionCrops:
    """``derive`` of the region feature kind: the proposer's boxes cropped from the image."""

    def __init__(self, proposer: Callable):
        self.proposer = proposer

    def __call__(self, sample: SampleImage) -> list:
        boxes, _ = proposed_boxes(self.proposer, sample)
        return [sample.image.crop(box) for box in boxes]


def region_kind(proposer: Callable):
    """The cached (N, R, D) feature kind of ``proposer``'s region embeddings (crops, streamed per batch)."""
    from ...features import ImageSetKind

    return ImageSetKind(name=f"regions[{proposer.config}]", derive=RegionCrops(proposer), count=proposer.count,
                        config=proposer.config)


def checked_proposer(name: str, proposer: Any) -> tuple[str, Callable]:
    """``(name, proposer)`` once the proposer has the attributes RaVL relies on."""
    from ...plugins import PluginError

    if not isinstance(getattr(proposer, "count", None), int) or proposer.count < 1 or not hasattr(proposer, "config"):
        raise PluginError(f"region proposer {name!r} must have an int attribute 'count' (boxes per image, >= 1) "
                          f"and a string attribute 'config'")
    return name, proposer


def proposer_for(ctx: Any, name: str) -> tuple[str, Callable]:
    """The registered region proposer ``name`` (built-in or third party), made with its own typed config."""
    return checked_proposer(name, ctx.region_proposer(name))
