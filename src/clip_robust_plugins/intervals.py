"""Confidence intervals for the group metrics of one run (definitions: ``docs/report.md``).

- Each group's accuracy gets a Wilson score interval.
- Worst-group accuracy, the averages, the gaps and every method's paired difference from the
  baseline get a seeded percentile bootstrap that resamples *within each group* (the group
  sizes are those of the evaluated split).

The resample is a matrix of draw counts (how often each sample of the split is drawn), made
by :class:`Resampler` per group from a generator seeded by ``(seed, split, group, chunk)``
only.  So every method and every metric of a run sees the same resamples (differences stay
paired), and a method's intervals depend only on its own predictions, the labels, the seed
and the split, never on which other methods ran.  numpy only: cheap to import.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator, Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from .argtypes import at_least, option

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .results import EvalResult, MethodResult

#: statistics bootstrapped per method (keys as the group metric names them)
BOOTSTRAP_STATS = ("worst_group_acc", "acc", "acc_train_weighted", "acc_group_mean", "gap_sample_mean",
                   "gap_train_weighted")
#: statistics whose paired difference from the baseline is reported
DELTA_STATS = ("worst_group_acc", "acc", "acc_train_weighted", "acc_group_mean")
#: salt of the bootstrap's random stream, so it never coincides with another use of --seed
_SALT = 0x1C
#: resamples drawn per generator (a fixed number, so the stream does not depend on memory)
CHUNK = 32


def _level(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        import argparse

        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class IntervalConfig:
    """The flags of the intervals (``--bootstrap_samples``, ``--ci_level``); the one place of their defaults."""

    bootstrap_samples: int = option(1000, "bootstrap resamples for the intervals of worst-group accuracy, the "
                                    "averages, the gaps, calibration, precision/F1, AUROC and the differences "
                                    "from the baseline (0: Wilson intervals only)", type=at_least(0))
    ci_level: float = option(0.95, "confidence level of every interval", type=_level)


def interval_config(options: Any) -> IntervalConfig:
    """The intervals' settings from parsed flags (flags not given take the defaults)."""
    from .argtypes import config_from_options

    return config_from_options(IntervalConfig, "", options)


def z_value(level: float) -> float:
    """The two-sided standard-normal quantile of ``level`` (1.95996... for 0.95)."""
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson_interval(hits: Any, n: Any, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of ``hits / n`` (elementwise); NaN where ``n == 0``."""
    hits = np.asarray(hits, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z2 = z_value(level) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        p = hits / n
        denom = 1.0 + z2 / n
        center = (p + z2 / (2.0 * n)) / denom
        half = math.sqrt(z2) * np.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
        # the interval always contains p; min/max only undo rounding at p = 0 or 1
        low = np.clip(np.minimum(center - half, p), 0.0, 1.0)
        high = np.clip(np.maximum(center + half, p), 0.0, 1.0)
    empty = n <= 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


# --------------------------------------------------------------------------- the resamples


def stream_key(seed: Any, split: str) -> list[int]:
    """The entropy words of the bootstrap's generators: the run seed, a salt and the split's name."""
    return [int(seed or 0) % 2**64, _SALT, zlib.crc32(str(split).encode("utf-8"))]


class Resampler:
    """Within-group bootstrap resamples of one evaluated split, as draw-count matrices.

    Resample ``b`` draws ``n_g`` samples with replacement from each group ``g``.  The draws
    of group ``g`` for resamples ``[c * CHUNK, (c + 1) * CHUNK)`` come from
    ``numpy.random.default_rng(stream_key(seed, split) + [g, c])``: they depend on the seed,
    the split, the group's index and size, nothing else.
    """

    def __init__(self, groups: Any, n_groups: int, n_boot: int, seed: Any = 0, split: str = "test"):
        self.groups = np.asarray(groups, dtype=np.int64)
        self.n_groups = int(n_groups)
        self.n_boot = int(n_boot)
        self.key = stream_key(seed, split)
        self.sizes = np.bincount(self.groups, minlength=self.n_groups)[: self.n_groups]
        order = np.argsort(self.groups, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.sizes)])
        #: each group's sample indices, in split order
        self.members = [order[starts[g] : starts[g + 1]] for g in range(self.n_groups)]
        self.present = np.flatnonzero(self.sizes > 0)

    def group_counts(self, g: int, chunk: int) -> np.ndarray:
        """``(rows, n_g)``: how often each member of group ``g`` is drawn in the resamples of ``chunk``."""
        n = int(self.sizes[g])
        rows = min(CHUNK, self.n_boot - chunk * CHUNK)
        draws = np.random.default_rng([*self.key, g, chunk]).integers(0, n, size=(rows, n))
        flat = (draws + (np.arange(rows) * n)[:, None]).ravel()
        return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)

    def chunks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """``(rows, W)`` per chunk: ``W`` is ``(len(rows), N)``, the draw counts of every sample."""
        for chunk, start in enumerate(range(0, self.n_boot, CHUNK)):
            rows = min(CHUNK, self.n_boot - start)
            weights = np.zeros((rows, self.groups.size))
            for g in self.present:
                weights[:, self.members[g]] = self.group_counts(int(g), chunk)
            yield slice(start, start + rows), weights

    def group_sums(self, values: Any) -> np.ndarray:
        """``(n_boot, G, K)``: per resample and group, the sum of ``values`` ``(N, K)`` over the drawn samples."""
        values = np.asarray(values, dtype=np.float64).reshape(self.groups.size, -1)
        out = np.zeros((self.n_boot, self.n_groups, values.shape[1]))
        for chunk, start in enumerate(range(0, self.n_boot, CHUNK)):
            for g in self.present:
                counts = self.group_counts(int(g), chunk)
                out[start : start + counts.shape[0], g] = counts @ values[self.members[g]]
        return out


def segment_sums(weights: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """``(rows, n_labels)``: ``weights`` ``(rows, n)`` summed over the columns of each label (no one-hot matrix)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros((weights.shape[0], n_labels))
    if labels.size == 0:
        return out
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    out[:, sorted_labels[starts]] = np.add.reduceat(weights[:, order], starts, axis=1)
    return out


def percentile_interval(reps: np.ndarray, estimate: float, level: float) -> tuple[float, float]:
    """Percentile interval of the replicates, widened to contain the point estimate (NaN when undefined)."""
    reps = np.asarray(reps, dtype=np.float64)
    if not math.isfinite(estimate) or not np.isfinite(reps).all():
        return math.nan, math.nan
    alpha = 1.0 - level
    low, high = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(min(low, estimate)), float(max(high, estimate))


# --------------------------------------------------------------------------- accuracy statistics


def group_statistics(hits: np.ndarray, sizes: np.ndarray, train_weights: np.ndarray | None) -> dict[str, np.ndarray]:
    """Worst group, the three averages and both gaps from per-group hit counts.

    ``hits`` is ``(..., G)`` over the *non-empty* groups, ``sizes`` their sizes ``(G,)``;
    ``train_weights`` the training counts of those groups (None: train-weighted is NaN).
    The one definition of these statistics: :func:`clip_robust_plugins.metrics.group_metrics`
    computes its point values with it.
    """
    hits = np.asarray(hits, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    acc_g = hits / sizes
    out = {
        "worst_group_acc": acc_g.min(axis=-1),
        "acc": hits.sum(axis=-1) / sizes.sum(),
        "acc_group_mean": acc_g.mean(axis=-1),
    }
    if train_weights is not None and np.sum(train_weights) > 0:
        weights = np.asarray(train_weights, dtype=np.float64)
        out["acc_train_weighted"] = (acc_g * weights).sum(axis=-1) / weights.sum()
    else:
        out["acc_train_weighted"] = np.full(acc_g.shape[:-1], np.nan)
    out["gap_sample_mean"] = out["acc"] - out["worst_group_acc"]
    out["gap_train_weighted"] = out["acc_train_weighted"] - out["worst_group_acc"]
    return out


def bootstrap_replicates(resampler: Resampler, correct: np.ndarray, train_counts: Sequence[int] | None
                         ) -> dict[str, np.ndarray]:
    """``{statistic: (n_boot, M)}``: the accuracy statistics of every method ``correct`` ``(M, N)`` per resample."""
    hits = resampler.group_sums(np.asarray(correct, dtype=np.float64).T)  # (B, G, M)
    present = resampler.present
    weights = None if train_counts is None else np.asarray(train_counts, dtype=np.float64)[present]
    return group_statistics(np.moveaxis(hits[:, present], 1, 2), resampler.sizes[present], weights)


def method_intervals(
    correct: np.ndarray,
    groups: np.ndarray,
    group_names: Sequence[str],
    train_counts: Sequence[int] | None,
    n_boot: int,
    level: float,
    seed: int,
    method_names: Sequence[str],
    split: str = "test",
) -> list[dict[str, float]]:
    """The interval keys (relative, as in a method's metrics) for every method; method 0 is the baseline."""
    correct = np.asarray(correct, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = len(group_names)
    if train_counts is not None and len(train_counts) != n_groups:
        raise ValueError(f"{len(train_counts)} training group counts for {n_groups} groups")
    sizes = np.bincount(groups, minlength=n_groups)
    hits = np.stack([np.bincount(groups, weights=c, minlength=n_groups) for c in correct.astype(np.float64)])
    low, high = wilson_interval(hits, sizes[None, :], level)
    out: list[dict[str, float]] = []
    for m in range(correct.shape[0]):
        keys: dict[str, float] = {}
        for g, name in enumerate(group_names):
            keys[f"group_acc_ci_low/{name}"] = float(low[m, g])
            keys[f"group_acc_ci_high/{name}"] = float(high[m, g])
        out.append(keys)
    if n_boot <= 0:
        return out

    resampler = Resampler(groups, n_groups, n_boot, seed, split)
    present = resampler.present
    if not present.size:  # nothing evaluated: every statistic is NaN
        nan = {f"{s}_ci_{side}": math.nan for s in BOOTSTRAP_STATS for side in ("low", "high")}
        for m, keys in enumerate(out):
            keys.update(nan)
            if m:
                keys.update(_delta_keys({s: math.nan for s in DELTA_STATS}, None, method_names[0], level))
        return out
    weights = None if train_counts is None else np.asarray(train_counts, dtype=np.float64)[present]
    point = group_statistics(hits[:, present], sizes[present], weights)
    reps = bootstrap_replicates(resampler, correct, train_counts)
    for m, keys in enumerate(out):
        for stat in BOOTSTRAP_STATS:
            keys[f"{stat}_ci_low"], keys[f"{stat}_ci_high"] = percentile_interval(reps[stat][:, m],
                                                                                  float(point[stat][m]), level)
        if m:
            estimates = {s: float(point[s][m] - point[s][0]) for s in DELTA_STATS}
            diffs = {s: reps[s][:, m] - reps[s][:, 0] for s in DELTA_STATS}
            keys.update(_delta_keys(estimates, diffs, method_names[0], level))
    return out


def _delta_keys(estimates: dict[str, float], diffs: dict[str, np.ndarray] | None, baseline: str,
                level: float) -> dict[str, float]:
    keys: dict[str, float] = {}
    for stat, estimate in estimates.items():
        name = f"delta_{stat}_vs_{baseline}"
        keys[name] = estimate
        lo, hi = (math.nan, math.nan) if diffs is None else percentile_interval(diffs[stat], estimate, level)
        keys[f"{name}_ci_low"], keys[f"{name}_ci_high"] = lo, hi
    return keys


def add_method_intervals(
    methods: Sequence[MethodResult],
    y: np.ndarray,
    groups: np.ndarray,
    group_names: Sequence[str],
    train_counts: Sequence[int] | None = None,
    n_boot: int = IntervalConfig.bootstrap_samples,
    level: float = IntervalConfig.ci_level,
    seed: int = 0,
    split: str = "test",
) -> None:
    """Add the interval keys into each ``MethodResult.metrics`` (``methods[0]`` is the baseline).

    Call it before the results JSON's flat metrics are built from the methods' metrics.
    """
    if not methods:
        return
    correct = np.stack([np.asarray(m.pred) == np.asarray(y) for m in methods])
    names = [m.name for m in methods]
    for method, keys in zip(methods, method_intervals(correct, groups, group_names, train_counts, n_boot, level, seed,
                                                       names, split)):
        method.metrics.update(keys)


def add_intervals(
    result: EvalResult,
    n_boot: int = IntervalConfig.bootstrap_samples,
    level: float = IntervalConfig.ci_level,
    seed: int = 0,
    train_counts: Sequence[int] | None = None,
) -> None:
    """Add the interval keys to every method of a finished run and to its results JSON (``<method>/<key>``).

    ``train_counts``: the training split's counts of ``result.group_names`` (the weights of
    ``acc_train_weighted``; None leaves its intervals NaN).  The split that seeds the
    resamples is the run's (``robust.split``).  The settings are recorded under
    ``robust.intervals``.
    """
    split = str(result.dump.get("robust", {}).get("split", "test"))
    add_method_intervals(result.methods, result.y, result.groups, result.group_names, train_counts, n_boot, level,
                         seed, split)
    flat = result.dump.setdefault("metrics", {})
    for method in result.methods:
        for key, value in method.metrics.items():
            if "_ci_" in key or key.startswith("delta_"):
                flat[f"{method.name}/{key}"] = value
    result.dump.setdefault("robust", {})["intervals"] = describe(n_boot, level, seed, split)


def describe(n_boot: int, level: float, seed: int, split: str = "test") -> dict[str, Any]:
    """What the results JSON records about the intervals (``robust.intervals``)."""
    return {
        "ci_level": level,
        "group_acc": "wilson",
        "bootstrap_samples": n_boot,
        "bootstrap": ("percentile; resampling within each group, the same resamples for every method and metric "
                      "(paired), drawn from generators seeded by (seed, split, group, chunk)") if n_boot else None,
        "seed": seed,
        "split": split,
    }
