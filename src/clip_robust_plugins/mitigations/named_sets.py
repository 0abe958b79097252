"""Named sets of methods for ``--mitigation`` (``all_baselines``): expanded against the
registry and the dataset's labels and splits, before any work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NAMED_SETS = ("all_baselines",)


def expand_named_sets(requested: Sequence[str], registry: Any, dataset: Any) -> tuple[list[str], dict[str, str]]:
    """``requested`` with ``all_baselines`` replaced by every registered non-baseline method
    whose labels the dataset has (group labels need ``has_group_labels``) and whose fit
    splits it has; returns (methods in order, skipped method -> reason)."""
    labels = {"class", "group"} if dataset.has_group_labels else {"class"}
    splits = set(dataset.splits())
    out: list[str] = []
    skipped: dict[str, str] = {}
    for name in requested:
        if name not in NAMED_SETS:
            out.append(name)
            continue
        for method, spec in sorted(registry.mitigations.items()):
            missing_labels = sorted(set(spec.needs.labels) - labels)
            missing_splits = sorted(set(spec.needs.fit_splits) - splits)
            if spec.baseline:
                continue
            if missing_labels or missing_splits:
                skipped[method] = f"needs {'labels ' + ', '.join(missing_labels) if missing_labels else 'splits ' + ', '.join(missing_splits)}"
                continue
            out.append(method)
    return list(dict.fromkeys(out)), skipped
