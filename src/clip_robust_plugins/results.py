"""The result records of one evaluation run, before anything is printed or written.

The engine produces them; the report layer renders them; the CLI decides what to write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch


@dataclass
class MethodResult:
    """One evaluated method: its predictions on the eval split and what it recorded."""

    name: str
    logits: torch.Tensor
    pred: np.ndarray
    metrics: dict[str, float | str]
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Everything a run produced: the results JSON (``dump``) and the per-sample arrays."""

    dump: dict[str, Any]
    keys: tuple[str, ...]
    y: np.ndarray
    group_names: list[str]
    groups: np.ndarray
    methods: list[MethodResult]
    provenance: dict[str, Any] = field(default_factory=dict)
    #: extra files a plugin produced for this run: (name suffix, writer(path)) pairs written
    #: beside the results JSON, all-or-nothing with it (e.g. a method's training-curve plot)
    extra_files: list[tuple[str, Any]] = field(default_factory=list)


def labels_used_record(read: dict[str, str]) -> dict[str, Any]:
    """The results JSON's ``labels_used`` of one method: ``{"labels": "none"|"class"|"group",
    "splits": {split: "class"|"group"}}`` (the highest kind read, and what was read per split)."""
    level = "group" if "group" in read.values() else ("class" if read else "none")
    return {"labels": level, "splits": dict(sorted(read.items()))}
