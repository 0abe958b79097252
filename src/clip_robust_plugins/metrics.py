"""Group-aware metrics (a built-in plugin) and the pure functions behind them.

Definitions (all fractions in [0, 1]; keys are relative, the engine adds ``<method>/``):

- ``acc``: sample mean accuracy over the evaluated split;
- ``acc_train_weighted``: group accuracies weighted by the *training* split's group
  proportions (what the Waterbirds literature calls "average accuracy"); NaN when the
  dataset does not record training counts;
- ``acc_group_mean``: unweighted mean of the group accuracies;
- ``worst_group_acc`` and ``worst_group_name``;
- ``gap`` = ``acc - worst_group_acc`` and ``gap_train_weighted`` = ``acc_train_weighted -
  worst_group_acc``;
- ``worst_class_acc`` and ``balanced_acc`` (mean per-class recall);
- ``group_acc/<group>`` and ``group_count/<group>`` per group.

Empty groups (count 0 in the evaluated split) are reported with count 0 and accuracy
NaN, and are excluded from the worst group and from all three averages; the
train-weighted average renormalises the training proportions over non-empty groups.
Groupings other than ``default`` get the same keys under ``<grouping>/``.

Intervals (Wilson per group, a within-group bootstrap for the rest, paired differences from
the baseline) need every method's predictions at once, so they are added after the
metrics by :func:`clip_robust_plugins.intervals.add_intervals`; this plugin adds their
flags (``--bootstrap_samples``, ``--ci_level``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .groups import DEFAULT_GROUPING
from .hookspecs import hookimpl
from .intervals import IntervalConfig
from .records import MetricSpec, Predictions


def group_metrics(
    pred: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    group_names: Sequence[str],
    train_counts: Sequence[int] | None = None,
) -> dict[str, float | str]:
    """Per-group accuracy and counts, worst group, the three averages and the gaps."""
    pred, y, groups = np.asarray(pred), np.asarray(y), np.asarray(groups)
    n_groups = len(group_names)
    correct = (pred == y).astype(np.float64)
    counts = np.bincount(groups, minlength=n_groups).astype(np.int64)
    hits = np.bincount(groups, weights=correct, minlength=n_groups)
    present = counts > 0
    group_acc = np.full(n_groups, np.nan)
    group_acc[present] = hits[present] / counts[present]

    out: dict[str, float | str] = {}
    for name, acc, count in zip(group_names, group_acc, counts):
        out[f"group_acc/{name}"] = float(acc)
        out[f"group_count/{name}"] = float(count)
    acc = float(correct.mean()) if correct.size else math.nan
    out["acc"] = acc
    if present.any():
        worst = int(np.flatnonzero(present)[np.argmin(group_acc[present])])
        out["worst_group_acc"] = float(group_acc[worst])
        out["worst_group_name"] = group_names[worst]
        out["acc_group_mean"] = float(group_acc[present].mean())
    else:
        out["worst_group_acc"] = math.nan
        out["worst_group_name"] = ""
        out["acc_group_mean"] = math.nan
    weighted = math.nan
    if train_counts is not None:
        weights = np.asarray(train_counts, dtype=np.float64) * present
        if weights.sum() > 0:
            weighted = float((weights[present] * group_acc[present]).sum() / weights.sum())
    out["acc_train_weighted"] = weighted
    out["gap"] = acc - out["worst_group_acc"]
    out["gap_train_weighted"] = weighted - out["worst_group_acc"]
    return out


def worst_group_accuracy(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Accuracy of the worst non-empty group (NaN when there are no samples): what model
    selection and hyperparameter choice inside DFR and CFR maximise."""
    pred, y, groups = np.asarray(pred), np.asarray(y), np.asarray(groups)
    if groups.size == 0:
        return math.nan
    counts = np.bincount(groups)
    hits = np.bincount(groups, weights=(pred == y).astype(np.float64), minlength=counts.size)
    present = counts > 0
    return float((hits[present] / counts[present]).min())


def class_metrics(pred: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """Worst-class accuracy and balanced accuracy (mean recall over classes present)."""
    pred, y = np.asarray(pred), np.asarray(y)
    counts = np.bincount(y, minlength=n_classes)
    hits = np.bincount(y, weights=(pred == y).astype(np.float64), minlength=n_classes)
    present = counts > 0
    recall = hits[present] / counts[present]
    return {
        "worst_class_acc": float(recall.min()) if recall.size else math.nan,
        "balanced_acc": float(recall.mean()) if recall.size else math.nan,
    }


def topk_accuracies(logits: np.ndarray, y: np.ndarray, ks: Sequence[int]) -> list[float]:
    """clip_benchmark's top-k accuracies, without its numpy>=2.4 ``float()`` crash.

    Like clip_benchmark, takes ``torch.topk(max(ks))`` once and slices it, so ties
    (common in bf16 logits) break exactly as there and acc1 matches on the same logits.
    """
    import torch

    top = torch.from_numpy(np.ascontiguousarray(logits)).topk(max(ks), 1, True, True)[1]
    correct = top == torch.as_tensor(np.asarray(y)).view(-1, 1)
    return [correct[:, :k].any(dim=1).sum().item() / len(y) for k in ks]


def _group_metric(p: Predictions) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for grouping in p.schema.groupings:
        ids = p.schema.group_ids(p.fields, grouping)
        values = group_metrics(
            p.pred, p.y, ids, p.schema.group_names(grouping), p.schema.counts("train", grouping)
        )
        prefix = "" if grouping == DEFAULT_GROUPING else f"{grouping}/"
        out.update({prefix + k: v for k, v in values.items()})
    out.update(class_metrics(p.pred, p.y, len(p.schema.classnames)))
    return out


def _clip_benchmark_metric(p: Predictions) -> dict[str, float]:
    """clip_benchmark's zero-shot keys: acc1, acc5 (NaN under 5 classes), mean_per_class_recall."""
    if p.logits is None:
        return {}
    n_classes = p.logits.shape[1]
    acc1, acc5 = topk_accuracies(p.logits, p.y, (1, 5)) if n_classes >= 5 else (*topk_accuracies(p.logits, p.y, (1,)), math.nan)
    return {
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": class_metrics(p.pred, p.y, n_classes)["balanced_acc"],
    }


@hookimpl
def register_metrics(register):
    register(MetricSpec("group", _group_metric, "per-group accuracy/count, worst group, averages, gaps, worst class"))
    register(MetricSpec("clip_benchmark", _clip_benchmark_metric, "clip_benchmark's acc1, acc5, mean_per_class_recall"))


@hookimpl
def add_arguments(parser):
    from .argtypes import add_config_flags

    add_config_flags(parser, IntervalConfig, "", topic="intervals")
