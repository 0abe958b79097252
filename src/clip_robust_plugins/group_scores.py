"""Calibration, precision/F1 and AUROC per group, with bootstrap intervals (definitions: ``docs/report.md``).

Every statistic is computed from *draw counts*: the point value with every sample counted
once, each bootstrap replicate with the counts of one resample of
:class:`~clip_robust_plugins.intervals.Resampler` (the same resamples as the accuracy
intervals, so all of a run's intervals are paired).  One code path for both.

- ``group_ece/<g>``: expected calibration error of group ``g``: the confidence (the largest
  softmax probability of the logits) in ``n_bins`` equal-width bins of [0, 1] (right-closed;
  15 by default), ``sum_k |hits_k - confidence_k| / n_g``; ``ece`` over the whole split;
  ``worst_group_ece`` the largest (with ``worst_group_ece_name``).
- ``group_precision/<g>`` and ``group_f1/<g>``: when the grouping contains the class field,
  group ``g`` = (class ``c``, slice ``s`` of the other fields) and its precision is class
  ``c``'s precision among the samples of slice ``s`` (predicted ``c`` and truly ``c`` over
  predicted ``c``), its F1 the harmonic mean with its recall (the group's accuracy); else the
  macro average over the classes present (as labels or predictions) in the group, as
  scikit-learn's ``average="macro"``.  Zero where nothing was predicted (``zero_division=0``).
  ``worst_group_precision``, ``worst_group_f1``: the smallest; ``worst_class_precision``,
  ``worst_class_f1``: the smallest over classes on the whole split (SubpopBench's columns).
- ``auroc`` and ``auroc/<slice>`` (two-class tasks): the area under the ROC curve of the
  class-1 probability, over the split and within each slice (a group holding one class has no
  AUROC, so with class x attribute groups the slices are the attribute values); ties count
  one half; ``worst_auroc`` the smallest.  Undefined (NaN) in a slice without both classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .argtypes import at_least, option
from .groups import DEFAULT_GROUPING
from .intervals import CHUNK, IntervalConfig, Resampler, percentile_interval, segment_sums

#: the name of the whole split when the slices have no fields (a class-only grouping)
ALL = "all"


@dataclasses.dataclass(frozen=True)
class GroupScoresConfig(IntervalConfig):
    """The bootstrap flags (shared with every interval) and the calibration bins."""

    ece_bins: int = option(15, "equal-width confidence bins of the expected calibration error", type=at_least(1))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confidence_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence: ``k`` for ``k/n < c <= (k+1)/n`` (0 also in the first bin)."""
    return np.clip(np.ceil(np.asarray(confidence) * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def weighted_auroc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC per row of ``weights`` ``(R, n)`` (sample multiplicities), ties one half; NaN without both classes.

    The same computation as the statistics' (:func:`_auroc_from_counts` on weights per distinct score).
    """
    values, rank = np.unique(np.asarray(score), return_inverse=True)
    positive = np.asarray(positive, dtype=bool)
    weights = np.asarray(weights, dtype=np.float64)
    return _auroc_from_counts(segment_sums(weights * positive, rank, values.size),
                              segment_sums(weights * ~positive, rank, values.size))


@dataclasses.dataclass
class _Split:
    """What the statistics read of one method on one split, arranged by group and slice.

    ``matrices[g]`` is group ``g``'s sparse ``(n_g, K_g)`` design: one product with a chunk's
    draw counts gives every per-group sum the statistics need (see :func:`_columns`).
    """

    group_names: list[str]
    group_class: np.ndarray | None  # (G,) the class of each group when the grouping holds the class field
    slice_names: list[str]
    group_slice: np.ndarray  # (G,) the slice of each group
    n_classes: int
    n_bins: int
    scores: bool  # calibration and AUROC (the method has logits)
    n_unique: int  # distinct class-1 probabilities over the split (two-class AUROC), 0 without
    slice_unique: list[int]  # the same within each slice
    matrices: list[Any]
    pairs: list[Any]


def _arrange(p: Any, n_bins: int, members: list[np.ndarray]) -> _Split:
    schema = p.schema
    fields = schema.grouping_fields(DEFAULT_GROUPING)
    y, pred = np.asarray(p.y, dtype=np.int64), np.asarray(p.pred, dtype=np.int64)
    n_groups = schema.n_groups()
    rest = tuple(f for f in fields if f != schema.class_field)
    if rest == fields:  # no class field: every group is its own slice
        slice_names, group_slice, group_class = schema.group_names(), np.arange(n_groups), None
    else:
        if rest:
            view = dataclasses.replace(schema, groupings={**schema.groupings, "_slices": rest})
            slice_names = view.group_names("_slices")
        else:
            slice_names = [ALL]
        # the class and slice of each group, from the mixed-radix layout of the group ids
        combos = np.array(np.meshgrid(*[np.arange(schema.field(f).size) for f in fields], indexing="ij"))
        combos = combos.reshape(len(fields), -1).T  # (G, n_fields) in group-id order
        group_class = combos[:, fields.index(schema.class_field)]
        group_slice = np.zeros(n_groups, np.int64)
        for f in rest:
            group_slice = group_slice * schema.field(f).size + combos[:, fields.index(f)]
    n_classes = len(schema.classnames)
    d = _Split(schema.group_names(), group_class, slice_names, group_slice, n_classes, n_bins, p.logits is not None,
               0, [0] * len(slice_names), [None] * n_groups, [None] * n_groups)
    ece_bin = ece_value = score = None
    if d.scores:
        prob = softmax(p.logits)
        confidence = prob.max(axis=1)
        ece_bin, ece_value = confidence_bins(confidence, n_bins), (pred == y) - confidence
        if n_classes == 2:
            score = prob[:, 1]
    unique_all = slice_rank = None
    if score is not None:
        values, unique_all = np.unique(score, return_inverse=True)
        d.n_unique = values.size
        slice_rank = np.zeros(y.size, np.int64)
        for s in range(len(slice_names)):
            idx = np.concatenate([members[g] for g in np.flatnonzero(group_slice == s)] or [np.zeros(0, np.int64)])
            if idx.size:
                u, inverse = np.unique(score[idx], return_inverse=True)
                slice_rank[idx] = inverse
                d.slice_unique[s] = u.size
    for g, idx in enumerate(members):
        if idx.size:
            d.matrices[g] = _design(d, g, idx, y, pred, ece_bin, ece_value, unique_all, slice_rank)
    return d


def _design(d: _Split, g: int, idx: np.ndarray, y, pred, ece_bin, ece_value, unique_all, slice_rank):
    """Group ``g``'s sparse design: columns [tp per class | predicted per class | true per class | ECE bins |
    the group's distinct (class-1 probability, negative) pairs], and where those pairs go (``d.pairs[g]``)."""
    from scipy import sparse

    n, c = idx.size, d.n_classes
    rows = [np.arange(n)] * 3
    cols = [pred[idx], c + pred[idx], 2 * c + y[idx]]
    vals = [(pred[idx] == y[idx]).astype(np.float64), np.ones(n), np.ones(n)]
    width = 3 * c
    if ece_bin is not None:
        rows.append(np.arange(n))
        cols.append(width + ece_bin[idx])
        vals.append(ece_value[idx])
        width += d.n_bins
    if unique_all is not None:
        negative = (y[idx] != 1).astype(np.int64)
        pairs, local = np.unique(np.stack([negative, unique_all[idx], slice_rank[idx]], axis=1), axis=0,
                                 return_inverse=True)
        d.pairs[g] = pairs.T  # (3, P): negative, rank over the split, rank within the slice
        rows.append(np.arange(n))
        cols.append(width + local.ravel())
        vals.append(np.ones(n))
        width += pairs.shape[0]
    return sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, width))


def _point_counts(resampler: Resampler) -> Iterator[list[np.ndarray | None]]:
    yield [np.ones((1, int(n))) if n else None for n in resampler.sizes]


def _boot_counts(resampler: Resampler) -> Iterator[list[np.ndarray | None]]:
    for chunk in range(math.ceil(resampler.n_boot / CHUNK)):
        yield [resampler.group_counts(g, chunk) if n else None for g, n in enumerate(resampler.sizes)]


def _auroc_from_counts(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """AUROC from weights per distinct score in increasing order (``(R, U)`` each), ties one half."""
    below = np.cumsum(negative, axis=1) - negative
    num = (positive * (below + 0.5 * negative)).sum(axis=1)
    den = positive.sum(axis=1) * negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _chunk_statistics(d: _Split, resampler: Resampler, counts: list[np.ndarray | None]) -> dict[str, np.ndarray]:
    """Every statistic for the rows of one chunk of draw counts (one list entry per group)."""
    rows = next(c.shape[0] for c in counts if c is not None)
    n_groups, n_slices, n_classes, u_all = len(d.group_names), len(d.slice_names), d.n_classes, d.n_unique
    ece = np.zeros((rows, n_groups, d.n_bins))
    confusion = np.zeros((rows, n_slices, 3, n_classes))  # tp, predicted, true
    ranks_all = np.zeros((rows, 2, u_all))
    ranks = [np.zeros((rows, 2, u)) for u in d.slice_unique]
    for g, c in enumerate(counts):
        if c is None:
            continue
        s = int(d.group_slice[g])
        sums = np.asarray((d.matrices[g].T @ c.T).T)
        confusion[:, s] += sums[:, : 3 * n_classes].reshape(rows, 3, n_classes)
        at = 3 * n_classes
        if d.scores:
            ece[:, g] = sums[:, at : at + d.n_bins]
            at += d.n_bins
        if u_all:  # the group's distinct (score, negative) pairs are unique: plain indexed adds
            negative, rank, rank_in_slice = d.pairs[g]
            ranks_all[:, negative, rank] += sums[:, at:]
            ranks[s][:, negative, rank_in_slice] += sums[:, at:]
    tp, predicted, true = confusion[:, :, 0], confusion[:, :, 1], confusion[:, :, 2]
    sizes = resampler.sizes.astype(np.float64)
    out: dict[str, np.ndarray] = {}
    present = sizes > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        group_ece = np.abs(ece).sum(axis=2) / np.where(present, sizes, np.nan)
        out["ece"] = np.abs(ece.sum(axis=1)).sum(axis=1) / max(sizes.sum(), 1.0)
        precision, f1 = _group_precision_f1(d, tp, predicted, true)
        precision[:, ~present] = np.nan  # an empty group has none
        f1[:, ~present] = np.nan
        class_tp, class_pred, class_true = tp.sum(axis=1), predicted.sum(axis=1), true.sum(axis=1)
        class_precision = np.where(class_pred > 0, class_tp / np.where(class_pred > 0, class_pred, 1), 0.0)
        class_f1 = np.where(class_pred + class_true > 0, 2 * class_tp / np.maximum(class_pred + class_true, 1), 0.0)
    for g, name in enumerate(d.group_names):
        out[f"group_ece/{name}"] = group_ece[:, g]
        out[f"group_precision/{name}"] = precision[:, g]
        out[f"group_f1/{name}"] = f1[:, g]
    out["worst_group_ece"] = np.nanmax(group_ece[:, present], axis=1) if present.any() else np.full(rows, np.nan)
    out["worst_group_precision"] = _nanmin(precision[:, present], rows)
    out["worst_group_f1"] = _nanmin(f1[:, present], rows)
    seen = class_true.max(axis=0) > 0  # classes with samples in the split
    out["worst_class_precision"] = _nanmin(class_precision[:, seen], rows)
    out["worst_class_f1"] = _nanmin(class_f1[:, seen], rows)
    if u_all:
        out["auroc"] = _auroc_from_counts(ranks_all[:, 0], ranks_all[:, 1])
        per_slice = [_auroc_from_counts(r[:, 0], r[:, 1]) for r in ranks]
        if len(d.slice_names) > 1 or d.slice_names[0] != ALL:
            out.update({f"auroc/{name}": v for name, v in zip(d.slice_names, per_slice)})
        out["worst_auroc"] = _nanmin(np.stack(per_slice, axis=1), rows)
    if not d.scores:
        out = {k: v for k, v in out.items() if "ece" not in k}
    return out


def _nanmin(values: np.ndarray, rows: int) -> np.ndarray:
    if values.shape[1] == 0:
        return np.full(rows, np.nan)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(values).all(axis=1), np.nan, np.nanmin(np.where(np.isnan(values), np.inf, values),
                                                                          axis=1))


def _group_precision_f1(d: _Split, tp: np.ndarray, predicted: np.ndarray, true: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, G)`` precision and F1 of every group (see the module's definitions)."""
    if d.group_class is not None:
        s, c = d.group_slice, d.group_class
        tp_g, pred_g, true_g = tp[:, s, c], predicted[:, s, c], true[:, s, c]
        precision = np.where(pred_g > 0, tp_g / np.where(pred_g > 0, pred_g, 1), 0.0)
        f1 = np.where(pred_g + true_g > 0, 2 * tp_g / np.maximum(pred_g + true_g, 1), 0.0)
        return precision, f1
    labels = (predicted + true) > 0  # classes present in the group (as labels or predictions)
    per_precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
    per_f1 = np.where(labels, 2 * tp / np.maximum(predicted + true, 1), 0.0)
    n_labels = labels.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_labels > 0, (per_precision * labels).sum(axis=2) / n_labels, np.nan)
        f1 = np.where(n_labels > 0, (per_f1 * labels).sum(axis=2) / n_labels, np.nan)
    return precision, f1


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def group_scores(p: Any, config: GroupScoresConfig | None = None, seed: Any = 0) -> dict[str, float | str]:
    """The point values of every statistic above and, with ``config.bootstrap_samples > 0``, their intervals."""
    config = config or GroupScoresConfig()
    groups = p.schema.group_ids(p.fields)
    resampler = Resampler(groups, p.schema.n_groups(), config.bootstrap_samples, seed, p.split)
    if not resampler.present.size:
        return {}
    d = _arrange(p, config.ece_bins, resampler.members)
    point = {k: float(v[0]) for k, v in _chunk_statistics(d, resampler, next(_point_counts(resampler))).items()}
    out: dict[str, float | str] = dict(point)
    if d.scores:
        ece = {name: point[f"group_ece/{name}"] for name in d.group_names}
        finite = {k: v for k, v in ece.items() if math.isfinite(v)}
        out["worst_group_ece_name"] = max(finite, key=finite.get) if finite else ""
    if config.bootstrap_samples <= 0:
        return out
    reps = _stack([_chunk_statistics(d, resampler, c) for c in _boot_counts(resampler)])
    for key, values in reps.items():
        if key not in out:
            continue
        head, _, tail = key.partition("/")
        low, high = percentile_interval(values, point[key], config.ci_level)
        suffix = f"/{tail}" if tail else ""
        out[f"{head}_ci_low{suffix}"], out[f"{head}_ci_high{suffix}"] = low, high
    return out
