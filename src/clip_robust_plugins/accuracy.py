"""Per-group and per-class accuracy: the pure numpy functions that metrics, and the model
selection inside methods (DFR's C, CFR's epoch, WiSE-FT's alpha, ...), share.

Below both in the data flow (datasets -> features -> mitigations -> metrics), so a method
can select on worst-group accuracy without importing the metrics plugin.
"""

from __future__ import annotations

import math

import numpy as np


def rates(labels: np.ndarray, correct: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(counts, hits, accuracy)`` per label value ``0..n-1`` (accuracy NaN where the count is 0).

    The one computation of per-group (and per-class) accuracy in the package.
    """
    labels = np.asarray(labels, dtype=np.int64)
    correct = np.asarray(correct, dtype=np.float64)
    counts = np.bincount(labels, minlength=n)[:n] if labels.size else np.zeros(n, np.int64)
    hits = np.bincount(labels, weights=correct, minlength=n)[:n] if labels.size else np.zeros(n)
    accuracy = np.full(n, np.nan)
    accuracy[counts > 0] = hits[counts > 0] / counts[counts > 0]
    return counts, hits, accuracy


def worst_group_accuracy(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Accuracy of the worst non-empty group (NaN when there are no samples): what model
    selection and hyperparameter choice inside DFR and CFR maximise."""
    groups = np.asarray(groups, dtype=np.int64)
    if groups.size == 0:
        return math.nan
    _, _, accuracy = rates(groups, np.asarray(pred) == np.asarray(y), int(groups.max()) + 1)
    return float(np.nanmin(accuracy))


def class_metrics(pred: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    """Worst-class accuracy and balanced accuracy (mean recall over classes present)."""
    _, _, recall = rates(y, np.asarray(pred) == np.asarray(y), n_classes)
    recall = recall[np.isfinite(recall)]
    return {
        "worst_class_acc": float(recall.min()) if recall.size else math.nan,
        "balanced_acc": float(recall.mean()) if recall.size else math.nan,
    }
