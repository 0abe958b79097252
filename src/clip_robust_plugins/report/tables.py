"""The report's data: the long table of every metric, and per dataset a leaderboard over seeds."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .load import Run, canonical, is_number, short, split_intervals

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
    """One method as one set of settings ran it: its runs differ in nothing but the seed."""

    model: str
    pretrained: str
    method: str
    baseline: bool
    settings: dict[str, Any] | None = None  # None: not recorded
    amp: bool | None = None
    runs: list[Run] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)
    #: the settings that tell this row from the method's other rows, e.g. ``(steps=100, lr=0.01)``
    suffix: str = ""
    #: per group: accuracy over the row's runs (``group_acc/<g>``, Wilson interval for one run)
    groups: dict[str, Stat] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The method as the page names it: ``seraser (steps=100, lr=0.01)`` when its settings tell it apart."""
        return f"{self.method} {self.suffix}" if self.suffix else self.method

    @property
    def label(self) -> str:
        return f"{self.model} / {self.pretrained} / {self.name}"

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
    #: the dataset settings that tell this table from the dataset's other tables, e.g. ``correlation=0.99``
    variant: str = ""
    #: samples per group in the evaluated split (from the first run)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.dataset} (split {self.split}, {len(self.groups)} groups{', ' + self.variant if self.variant else ''})"

    def display(self, row: Row) -> str:
        """How figures name a row: the method (with its settings), plus the model when the table has several."""
        models = {(r.model, r.pretrained) for r in self.rows}
        return row.name if len(models) == 1 else row.label

    def best(self, column: Column) -> set[int]:
        """Indices of the rows best in ``column`` (ties all marked)."""
        means = [(i, row.stats[column.title].mean) for i, row in enumerate(self.rows)]
        finite = [(i, m) for i, m in means if math.isfinite(m)]
        if len(finite) < 2:
            return set()
        target = (max if column.higher_is_better else min)(m for _, m in finite)
        return {i for i, m in finite if abs(m - target) <= 1e-12}


#: keys older results JSONs used for a quantity that now has another name
LEGACY_KEYS = {"gap_sample_mean": "gap"}


def _metric(run: Run, method: str, key: str) -> tuple[float | None, Any, Any]:
    folded = split_intervals(run.method_metrics(method))
    value, low, high = folded.get(key, folded.get(LEGACY_KEYS.get(key, key), (None, None, None)))
    return (float(value) if is_number(value) else None), low, high


def format_value(value: Any) -> str:
    """A setting as a row label shows it: ``0.01``, ``100``, ``a,b``, ``none``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def settings_suffix(settings: dict[str, Any] | None, amp: bool | None, others: Sequence[Row]) -> str:
    """The settings of one row that differ among ``others`` (the rows of one method), as ``(k=v, ...)``."""
    if len(others) < 2:
        return ""
    parts = []
    if settings is None:
        if any(o.settings is not None for o in others):
            parts.append("settings not recorded")
    else:
        keys = list(dict.fromkeys(k for o in others if o.settings is not None for k in o.settings))
        missing = object()
        for key in keys:
            values = {json.dumps(o.settings.get(key, None), sort_keys=True, default=str)
                      for o in others if o.settings is not None}
            if len(values) > 1:
                value = settings.get(key, missing)
                parts.append(f"{key}={'default' if value is missing else format_value(value)}")
    if len({o.amp for o in others}) > 1:
        parts.append({True: "amp", False: "fp32", None: "precision not recorded"}[amp])
    return f"({', '.join(parts)})" if parts else ""


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
    split, groups, _ = evaluated
    baseline = runs[0].baseline
    weighted = all(_metric(r, m, "acc_train_weighted")[0] is not None for r in runs for m in r.methods)
    avg_key, gap_key = ("acc_train_weighted", "gap_train_weighted") if weighted else ("acc", "gap_sample_mean")
    columns = [
        Column(_WGA, "worst_group_acc", True),
        Column("average acc (train-weighted)" if weighted else "average acc (sample mean)", avg_key, True),
        Column("gap (train-weighted - worst)" if weighted else "gap (sample mean - worst)", gap_key, False),
        Column(f"Δ worst-group vs {baseline}", "delta_worst_group_acc_vs_{baseline}", True),
    ]
    rows: dict[tuple, Row] = {}
    for run in runs:
        for method in run.methods:
            row = rows.get(run.identity(method))
            if row is None:
                row = rows[run.identity(method)] = Row(run.model, run.pretrained, method, method == run.baseline,
                                                       run.settings.get(method), run.amp)
            row.runs.append(run)
    families: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows.values():
        families.setdefault((row.model, row.pretrained, row.method), []).append(row)
    for row in rows.values():
        row.suffix = settings_suffix(row.settings, row.amp, families[(row.model, row.pretrained, row.method)])
        for column in columns:
            row.stats[column.title] = _stat(row, column.key)
        row.groups = {g: _stat(row, f"group_acc/{g}") for g in groups}
    ordered = sorted(rows.values(), key=lambda r: (-_finite(r.stats[columns[0].title].mean), r.label))
    section = Section(dataset, split, groups, slug, columns, ordered, baseline, variant=_variant(evaluated, variants))
    first = runs[0].method_metrics(baseline)
    section.counts = {g: int(first[f"group_count/{g}"]) for g in groups if is_number(first.get(f"group_count/{g}"))}
    section.notes += _notes(dataset, evaluated, runs, ordered, variants, weighted)
    return section


def _stat(row: Row, key: str) -> Stat:
    """``key`` over the row's runs (``{baseline}`` filled per run); the interval kept for a single run."""
    stat = Stat([])
    for run in row.runs:
        value, low, high = _metric(run, row.method, key.format(baseline=run.baseline))
        if value is not None:
            stat.values.append(value)
            stat.low, stat.high = low, high
    if stat.n != 1:
        stat.low = stat.high = None
    return stat


def _variant(evaluated: tuple, variants: list[tuple]) -> str:
    """The dataset settings in which ``evaluated`` differs from the dataset's other variants."""
    settings = [json.loads(v[2]) or {} for v in variants]
    if len({v[2] for v in variants}) < 2:
        return ""
    mine = json.loads(evaluated[2]) or {}
    keys = dict.fromkeys(k for s in settings for k in s)
    return ", ".join(f"{k}={format_value(mine.get(k))}" for k in keys
                     if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def describe_variant(variant: tuple) -> str:
    split, groups, settings = variant
    text = f"split {split} with groups {', '.join(groups)}"
    return text + (f", dataset settings {settings}" if settings != "null" else "")


def _notes(dataset: str, evaluated: tuple, runs: list[Run], rows: list[Row], variants: list[tuple],
           weighted: bool) -> list[str]:
    notes = []
    if len(variants) > 1:
        others = [describe_variant(v) for v in variants if v != evaluated]
        notes.append(
            f"{dataset} was also evaluated differently ({'; '.join(others)}); those runs are in a separate "
            "table and are never averaged with these."
        )
    if not weighted:
        notes.append("average acc is the sample mean (acc): some runs have no training group counts for the "
                     "train-weighted average.")
    if any(row.suffix for row in rows):
        notes.append("Rows of one method that differ in a recorded setting are separate rows, named by the settings "
                     "that differ; only runs that differ in nothing but the seed are averaged.")
    notes += duplicate_notes(rows)
    unknown = sorted({short(r.path) for row in rows if row.settings is None and not row.baseline for r in row.runs})
    if unknown:
        notes.append(f"no method settings recorded in {', '.join(unknown)} (results JSONs written before settings "
                     "were recorded, or methods without declared options): their runs are grouped by method and "
                     "seed only, without comparing settings.")
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


def duplicate_notes(rows: Sequence[Row]) -> list[str]:
    """A warning per row in which one seed appears more than once."""
    notes = []
    for row in rows:
        seeds = [canonical(s) for s in row.seeds]
        for seed in sorted({s for s in seeds if seeds.count(s) > 1}):
            files = ", ".join(short(r.path) for r in row.runs if canonical(r.seed) == seed)
            if row.settings is None:
                notes.append(f"{row.label}: seed {seed} in several files that record no settings ({files}); they may "
                             "differ in settings; all are counted.")
            else:
                notes.append(f"warning: {row.label}: seed {seed} with the same settings in several files ({files}): "
                             "one run counted twice; pass each run once.")
    return notes
