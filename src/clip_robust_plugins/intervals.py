"""Confidence intervals for the group metrics of one run (definitions: ``docs/report.md``).

- Each group's accuracy gets a Wilson score interval.
- Worst-group accuracy, the three averages (``acc``, ``acc_train_weighted``,
  ``acc_group_mean``), the gap and every method's paired difference from the baseline get a
  seeded percentile bootstrap that resamples *within each group* (the group sizes are
  fixed, as in the evaluated split) and uses the *same* resample for every method.

The bootstrap is vectorised without drawing sample indices: within one group a sample is
described by its correctness pattern over the methods (one bit per method), and resampling
``n_g`` samples with replacement is the same as drawing the pattern counts from
``Multinomial(n_g, pattern frequencies)``.  At most ``min(n_g, 2**methods)`` patterns per
group, so the cost is independent of the split size.  numpy only: cheap to import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from .argtypes import at_least, option

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .results import EvalResult, MethodResult

#: statistics bootstrapped per method (keys as the group metric names them)
BOOTSTRAP_STATS = ("worst_group_acc", "acc", "acc_train_weighted", "acc_group_mean", "gap", "gap_train_weighted")
#: statistics whose paired difference from the baseline is reported
DELTA_STATS = ("worst_group_acc", "acc", "acc_train_weighted", "acc_group_mean")
#: salt of the bootstrap's random stream, so it never coincides with another use of --seed
_SALT = 0x1C


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
                                    "averages and the differences from the baseline (0: Wilson intervals only)",
                                    type=at_least(0))
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


def group_statistics(hits: np.ndarray, sizes: np.ndarray, train_weights: np.ndarray | None) -> dict[str, np.ndarray]:
    """The bootstrapped statistics from per-group hit counts.

    ``hits`` is ``(..., G)`` over the *non-empty* groups, ``sizes`` their sizes ``(G,)``;
    ``train_weights`` the training counts of those groups (None: train-weighted is NaN).
    Same definitions as :func:`clip_robust_plugins.metrics.group_metrics`.
    """
    acc_g = hits / sizes
    out = {
        "worst_group_acc": acc_g.min(axis=-1),
        "acc": hits.sum(axis=-1) / sizes.sum(),
        "acc_group_mean": acc_g.mean(axis=-1),
    }
    if train_weights is not None and train_weights.sum() > 0:
        out["acc_train_weighted"] = (acc_g * train_weights).sum(axis=-1) / train_weights.sum()
    else:
        out["acc_train_weighted"] = np.full(acc_g.shape[:-1], np.nan)
    out["gap"] = out["acc"] - out["worst_group_acc"]
    out["gap_train_weighted"] = out["acc_train_weighted"] - out["worst_group_acc"]
    return out


def bootstrap_group_hits(
    correct: np.ndarray, groups: np.ndarray, n_groups: int, n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group hit counts of ``n_boot`` within-group resamples, paired across methods.

    ``correct`` is ``(M, N)`` bool (method x sample).  Returns ``(hits, present)``: ``hits``
    is ``(n_boot, M, G')`` over the ``G'`` non-empty groups, ``present`` their indices.
    """
    correct = np.asarray(correct, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    n_methods = correct.shape[0]
    counts = np.bincount(groups, minlength=n_groups)
    present = np.flatnonzero(counts > 0)
    hits = np.empty((n_boot, n_methods, present.size), dtype=np.float64)
    order = np.argsort(groups, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    for j, g in enumerate(present):
        members = order[starts[g] : starts[g + 1]]
        patterns, freq = np.unique(correct[:, members].T, axis=0, return_counts=True)  # (K, M), (K,)
        draws = rng.multinomial(int(counts[g]), freq / freq.sum(), size=n_boot)  # (B, K)
        hits[:, :, j] = draws @ patterns.astype(np.float64)
    return hits, present


def _percentile(reps: np.ndarray, estimate: float, level: float) -> tuple[float, float]:
    """Percentile interval of the replicates, widened to contain the point estimate."""
    if not math.isfinite(estimate) or not np.isfinite(reps).all():
        return math.nan, math.nan
    alpha = 1.0 - level
    low, high = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(min(low, estimate)), float(max(high, estimate))


def method_intervals(
    correct: np.ndarray,
    groups: np.ndarray,
    group_names: Sequence[str],
    train_counts: Sequence[int] | None,
    n_boot: int,
    level: float,
    seed: int,
    method_names: Sequence[str],
) -> list[dict[str, float]]:
    """The interval keys (relative, as in a method's metrics) for every method; method 0 is the baseline."""
    correct = np.asarray(correct, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = len(group_names)
    n_methods = correct.shape[0]
    if train_counts is not None and len(train_counts) != n_groups:
        raise ValueError(f"{len(train_counts)} training group counts for {n_groups} groups")
    sizes_all = np.bincount(groups, minlength=n_groups)
    hits_all = np.stack([np.bincount(groups, weights=c, minlength=n_groups) for c in correct.astype(np.float64)])
    low, high = wilson_interval(hits_all, sizes_all[None, :], level)
    out: list[dict[str, float]] = []
    for m in range(n_methods):
        keys: dict[str, float] = {}
        for g, name in enumerate(group_names):
            keys[f"group_acc_ci_low/{name}"] = float(low[m, g])
            keys[f"group_acc_ci_high/{name}"] = float(high[m, g])
        out.append(keys)
    if n_boot <= 0:
        return out

    present = np.flatnonzero(sizes_all > 0)
    if not present.size:  # nothing evaluated: every statistic is NaN
        nan = {f"{s}_ci_{side}": math.nan for s in BOOTSTRAP_STATS for side in ("low", "high")}
        for m, keys in enumerate(out):
            keys.update(nan)
            if m:
                keys.update(_delta_keys({s: math.nan for s in DELTA_STATS}, None, method_names[0], level))
        return out
    weights = None if train_counts is None else np.asarray(train_counts, dtype=np.float64)[present]
    point = group_statistics(hits_all[:, present], sizes_all[present].astype(np.float64), weights)
    reps = bootstrap_replicates(correct, groups, n_groups, train_counts, n_boot, np.random.default_rng([int(seed or 0), _SALT]))
    for m, keys in enumerate(out):
        for stat in BOOTSTRAP_STATS:
            lo, hi = _percentile(reps[stat][:, m], float(point[stat][m]), level)
            keys[f"{stat}_ci_low"], keys[f"{stat}_ci_high"] = lo, hi
        if m:
            estimates = {s: float(point[s][m] - point[s][0]) for s in DELTA_STATS}
            diffs = {s: reps[s][:, m] - reps[s][:, 0] for s in DELTA_STATS}
            keys.update(_delta_keys(estimates, diffs, method_names[0], level))
    return out


def bootstrap_replicates(
    correct: np.ndarray, groups: np.ndarray, n_groups: int, train_counts: Sequence[int] | None, n_boot: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``{statistic: (n_boot, M)}``: the bootstrapped statistics of every method, paired across methods."""
    hits, present = bootstrap_group_hits(correct, groups, n_groups, n_boot, rng)
    sizes = np.bincount(np.asarray(groups, dtype=np.int64), minlength=n_groups)[present].astype(np.float64)
    weights = None if train_counts is None else np.asarray(train_counts, dtype=np.float64)[present]
    return group_statistics(hits, sizes, weights)


def _delta_keys(estimates: dict[str, float], diffs: dict[str, np.ndarray] | None, baseline: str,
                level: float) -> dict[str, float]:
    keys: dict[str, float] = {}
    for stat, estimate in estimates.items():
        name = f"delta_{stat}_vs_{baseline}"
        keys[name] = estimate
        lo, hi = (math.nan, math.nan) if diffs is None else _percentile(diffs[stat], estimate, level)
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
) -> None:
    """Add the interval keys into each ``MethodResult.metrics`` (``methods[0]`` is the baseline).

    Call it before the results JSON's flat metrics are built from the methods' metrics.
    """
    if not methods:
        return
    correct = np.stack([np.asarray(m.pred) == np.asarray(y) for m in methods])
    names = [m.name for m in methods]
    for method, keys in zip(methods, method_intervals(correct, groups, group_names, train_counts, n_boot, level, seed,
                                                       names)):
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
    ``acc_train_weighted``; None leaves its intervals NaN).  The settings are recorded
    under ``robust.intervals``.
    """
    add_method_intervals(result.methods, result.y, result.groups, result.group_names, train_counts, n_boot, level, seed)
    flat = result.dump.setdefault("metrics", {})
    for method in result.methods:
        for key, value in method.metrics.items():
            if "_ci_" in key or key.startswith("delta_"):
                flat[f"{method.name}/{key}"] = value
    result.dump.setdefault("robust", {})["intervals"] = describe(n_boot, level, seed)


def describe(n_boot: int, level: float, seed: int) -> dict[str, Any]:
    """What the results JSON records about the intervals (``robust.intervals``)."""
    return {
        "ci_level": level,
        "group_acc": "wilson",
        "bootstrap_samples": n_boot,
        "bootstrap": "percentile, resampling within each group, paired across methods" if n_boot else None,
        "seed": seed,
    }
