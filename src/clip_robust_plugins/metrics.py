"""Group-aware metrics (a built-in plugin) and the pure functions behind them.

Definitions (all fractions in [0, 1]; keys are relative, the engine adds ``<method>/``):

- ``acc``: sample mean accuracy over the evaluated split;
- ``acc_train_weighted``: group accuracies weighted by the *training* split's group
  proportions (what the Waterbirds literature calls "average accuracy"); NaN when the
  dataset does not record training counts;
- ``acc_group_mean``: unweighted mean of the group accuracies;
- ``worst_group_acc`` and ``worst_group_name``;
- ``gap_sample_mean`` = ``acc - worst_group_acc`` and ``gap_train_weighted`` =
  ``acc_train_weighted - worst_group_acc`` (two quantities, two names);
- ``worst_class_acc`` and ``balanced_acc`` (mean per-class recall);
- ``group_acc/<group>`` and ``group_count/<group>`` per group.

Empty groups (count 0 in the evaluated split) are reported with count 0 and accuracy
NaN, and are excluded from the worst group and from all three averages; the
train-weighted average renormalises the training proportions over non-empty groups.
Groupings other than ``default`` get the same keys under ``<grouping>/``.

The metric ``group_scores`` (:mod:`clip_robust_plugins.group_scores`) adds calibration,
precision/F1 and AUROC per group with their intervals.  The accuracy intervals (Wilson per
group, a within-group bootstrap for the rest, paired differences from the baseline) need
every method's predictions at once, so they are added after the metrics by
:func:`clip_robust_plugins.intervals.add_intervals`.  Values that are undefined stay NaN in
memory and are written to the results JSON as ``null`` with the reason (:func:`null_reason`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .accuracy import class_metrics, rates, worst_group_accuracy  # noqa: F401 - worst_group_accuracy: public here too
from .groups import DEFAULT_GROUPING
from .hookspecs import hookimpl
from .intervals import group_statistics
from .specs import MetricSpec, Predictions


def group_metrics(
    pred: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    group_names: Sequence[str],
    train_counts: Sequence[int] | None = None,
) -> dict[str, float | str]:
    """Per-group accuracy and counts, worst group, the three averages and the two gaps."""
    correct = np.asarray(pred) == np.asarray(y)
    counts, hits, group_acc = rates(groups, correct, len(group_names))
    present = counts > 0
    out: dict[str, float | str] = {}
    for name, acc, count in zip(group_names, group_acc, counts):
        out[f"group_acc/{name}"] = float(acc)
        out[f"group_count/{name}"] = float(count)
    weights = None if train_counts is None else np.asarray(train_counts, dtype=np.float64)[present]
    if present.any():
        stats = group_statistics(hits[present], counts[present], weights)
        out.update({key: float(value) for key, value in stats.items()})
        out["worst_group_name"] = group_names[int(np.flatnonzero(present)[np.argmin(group_acc[present])])]
    else:
        out.update({key: math.nan for key in ("acc", "worst_group_acc", "acc_group_mean", "acc_train_weighted",
                                             "gap_sample_mean", "gap_train_weighted")})
        out["worst_group_name"] = ""
    return out


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


def _group_scores_metric(p: Predictions, ctx=None, mitigation=None, config=None) -> dict[str, float | str]:
    from .group_scores import group_scores

    return group_scores(p, config, seed=getattr(ctx, "seed", 0))


def null_reason(key: str) -> str:
    """Why a metric key (relative, without ``<method>/``) can be undefined: what the results JSON records beside its ``null``."""
    head, _, tail = key.partition("/")
    base = head.replace("_ci_low", "").replace("_ci_high", "")
    if base == "acc5":
        return "top-5 accuracy is undefined with fewer than 5 classes"
    if "train_weighted" in key:
        return "the dataset records no training-split group counts (the weights of the train-weighted average)"
    if base.startswith("auroc") or base == "worst_auroc":
        return "AUROC needs both classes among the samples (or scores: a method without logits)"
    if tail and base.startswith(("group_", "delta_")):
        return f"group {tail!r} has no samples in the evaluated split"
    if "_ci_" in key:
        return "no interval: the statistic is undefined in some resample or at the point estimate"
    return "undefined on this split (no samples where it is computed)"


@hookimpl
def register_metrics(register):
    from .group_scores import GroupScoresConfig

    register(MetricSpec("group", _group_metric, "per-group accuracy/count, worst group, averages, gaps, worst class"))
    register(MetricSpec("clip_benchmark", _clip_benchmark_metric, "clip_benchmark's acc1, acc5, mean_per_class_recall"))
    register(MetricSpec(
        "group_scores", _group_scores_metric,
        "per-group calibration (ECE), precision and F1, AUROC per slice (two-class tasks), with bootstrap intervals",
        takes_context=True, options=GroupScoresConfig, option_prefix=""))
