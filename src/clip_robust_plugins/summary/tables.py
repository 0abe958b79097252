"""The report's data: the long table of every metric, and per dataset a leaderboard over seeds."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .load import Run, is_number, short, split_intervals

_WGA = "worst-group acc"
LONG_COLUMNS = ("dataset", "split", "model", "pretrained", "method", "seed", "metric", "value", "ci_low", "ci_high",
                "source")


def long_rows(runs: Sequence[Run]) -> list[list[Any]]:
    """One row per (run, method, metric): the JSON's own values, interval keys folded into ci_low / ci_high.

    Keys without a method prefix (clip_benchmark's top-level copies of the baseline's acc1,
    acc5, mean_per_class_recall) are left out: the baseline's own rows hold them.
    """
    rows = []
    for run in runs:
        for method in run.methods:
            for metric, (value, low, high) in split_intervals(run.method_metrics(method)).items():
                rows.append([run.dataset, run.split, run.model, run.pretrained, method, run.seed, metric, value,
                             low, high, run.path])
    return rows


@dataclass
class Stat:
    """A leaderboard cell: the values of one metric over a row's runs."""

    values: list[float]
    low: float | None = None  # the interval, for a single run that has one
    high: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def has_interval(self) -> bool:
        return self.n == 1 and is_number(self.low) and is_number(self.high)

    def text(self) -> str:
        if not self.values:
            return "-"
        if self.n > 1:
            return f"{self.mean:.3f} ± {self.std:.3f}"
        if self.has_interval:
            return f"{self.values[0]:.3f} [{self.low:.3f}, {self.high:.3f}]"
        return f"{self.values[0]:.3f}"

    def error(self) -> tuple[float, float]:
        """(below, above) for an error bar: std over seeds, else the interval, else none."""
        if self.n > 1:
            return self.std, self.std
        if self.has_interval:
            return max(self.values[0] - self.low, 0.0), max(self.high - self.values[0], 0.0)
        return 0.0, 0.0


@dataclass
class Row:
    model: str
    pretrained: str
    method: str
    baseline: bool
    runs: list[Run] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model} / {self.pretrained} / {self.method}"

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


@dataclass
class Column:
    title: str
    key: str  # the metric key, or a template with {baseline}
    higher_is_better: bool


@dataclass
class Section:
    """One dataset evaluated one way (split and groups): a leaderboard and its plots."""

    dataset: str
    split: str
    groups: tuple[str, ...]
    slug: str
    columns: list[Column]
    rows: list[Row]
    baseline: str
    notes: list[str] = field(default_factory=list)
    error_note: str = ""

    @property
    def title(self) -> str:
        return f"{self.dataset} (split {self.split}, {len(self.groups)} groups)"

    def best(self, column: Column) -> set[int]:
        """Indices of the rows best in ``column`` (ties all marked)."""
        means = [(i, row.stats[column.title].mean) for i, row in enumerate(self.rows)]
        finite = [(i, m) for i, m in means if math.isfinite(m)]
        if len(finite) < 2:
            return set()
        target = (max if column.higher_is_better else min)(m for _, m in finite)
        return {i for i, m in finite if abs(m - target) <= 1e-12}


def _metric(run: Run, method: str, key: str) -> tuple[float | None, Any, Any]:
    folded = split_intervals(run.method_metrics(method))
    value, low, high = folded.get(key, (None, None, None))
    return (float(value) if is_number(value) else None), low, high


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


def build_sections(runs: Sequence[Run]) -> list[Section]:
    """Per dataset and per way it was evaluated, rows of model x pretrained x method over seeds."""
    by_variant: dict[tuple[str, tuple], list[Run]] = {}
    for run in runs:
        by_variant.setdefault((run.dataset, run.evaluated), []).append(run)
    variants_per_dataset: dict[str, list[tuple]] = {}
    for dataset, evaluated in by_variant:
        variants_per_dataset.setdefault(dataset, []).append(evaluated)
    sections = []
    used: set[str] = set()
    for (dataset, evaluated), members in by_variant.items():
        variants = variants_per_dataset[dataset]
        slug = _slug(dataset) + (f"_{variants.index(evaluated) + 1}" if len(variants) > 1 else "")
        base, k = slug, 1
        while slug in used:  # two dataset names that differ only in characters a file name cannot hold
            k += 1
            slug = f"{base}-{k}"
        used.add(slug)
        sections.append(_section(dataset, evaluated, members, slug, variants))
    return sections


def _section(dataset: str, evaluated: tuple, runs: list[Run], slug: str, variants: list[tuple]) -> Section:
    split, groups = evaluated
    baseline = runs[0].baseline
    weighted = all(_metric(r, m, "acc_train_weighted")[0] is not None for r in runs for m in r.methods)
    avg_key, gap_key = ("acc_train_weighted", "gap_train_weighted") if weighted else ("acc", "gap")
    columns = [
        Column(_WGA, "worst_group_acc", True),
        Column("average acc" + (" (train-weighted)" if weighted else ""), avg_key, True),
        Column("gap (train-weighted)" if weighted else "gap (sample mean)", gap_key, False),
        Column(f"Δ worst-group vs {baseline}", "delta_worst_group_acc_vs_{baseline}", True),
    ]
    rows: dict[tuple[str, str, str], Row] = {}
    for run in runs:
        for method in run.methods:
            key = (run.model, run.pretrained, method)
            row = rows.setdefault(key, Row(run.model, run.pretrained, method, method == run.baseline))
            row.runs.append(run)
    for row in rows.values():
        for column in columns:
            stat = Stat([])
            for run in row.runs:
                value, low, high = _metric(run, row.method, column.key.format(baseline=run.baseline))
                if value is not None:
                    stat.values.append(value)
                    stat.low, stat.high = low, high
            if stat.n != 1:
                stat.low = stat.high = None
            row.stats[column.title] = stat
    ordered = sorted(rows.values(), key=lambda r: (-_finite(r.stats[columns[0].title].mean), r.label))
    section = Section(dataset, split, groups, slug, columns, ordered, baseline)
    section.notes += _notes(dataset, evaluated, runs, ordered, variants, weighted)
    return section


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _notes(dataset: str, evaluated: tuple, runs: list[Run], rows: list[Row], variants: list[tuple],
           weighted: bool) -> list[str]:
    notes = []
    if len(variants) > 1:
        others = [f"split {s} with groups {', '.join(g)}" for s, g in variants if (s, g) != evaluated]
        notes.append(
            f"{dataset} was also evaluated differently ({'; '.join(others)}); those runs are in a separate "
            "table and are never averaged with these."
        )
    if not weighted:
        notes.append("average acc is the sample mean (acc): some runs have no training group counts for the "
                     "train-weighted average.")
    for row in rows:
        seeds = row.seeds
        repeated = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if repeated:
            files = ", ".join(short(r.path) for r in row.runs)
            notes.append(f"{row.label}: several runs with seed {', '.join(repeated)} ({files}); all are counted.")
    constant = [row.label for row in rows
                if row.stats[_WGA].n > 1 and row.stats[_WGA].std == 0.0]
    if constant:
        notes.append(f"± 0.000 in worst-group accuracy for {'; '.join(constant)}: the seeds did not change that "
                     "result, and the spread over seeds says nothing about test-set sampling; each run's own "
                     "interval is in results_long.csv (ci_low, ci_high).")
    if any(r.intervals is None for r in runs):
        missing = ", ".join(short(r.path) for r in runs if r.intervals is None)
        notes.append(f"no intervals recorded in {missing} (written before intervals existed, or with "
                     "--bootstrap_samples 0 for the bootstrap ones).")
    return notes
