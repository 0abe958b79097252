"""What a person reads: the per-group table, the results JSON, the predictions CSV, the plot.

All files are written to a temporary name in the target directory and renamed into
place only after every one of them was produced, so a failed run leaves nothing
half-written.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Sequence

from .atomic import write_files
from .metrics import null_reason
from .results import EvalResult
from .states import write_state

SUMMARY_ROWS = (
    ("worst group", "worst_group_acc"),
    ("acc (sample mean)", "acc"),
    ("acc (train-weighted)", "acc_train_weighted"),
    ("acc (group mean)", "acc_group_mean"),
    ("gap (sample mean - worst)", "gap_sample_mean"),
    ("gap (train-weighted - worst)", "gap_train_weighted"),
    ("balanced acc", "balanced_acc"),
)


#: the widest table printed with intervals in its cells; wider ones print point estimates only
TABLE_WIDTH = 160


def _fmt(value: float | str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _interval_keys(key: str) -> tuple[str, str]:
    """The interval keys beside a metric key: ``group_acc/<g>`` -> ``group_acc_ci_low/<g>``, ``x`` -> ``x_ci_low``."""
    if "/" in key:
        head, tail = key.split("/", 1)
        return f"{head}_ci_low/{tail}", f"{head}_ci_high/{tail}"
    return f"{key}_ci_low", f"{key}_ci_high"


def _cell(metrics: dict, key: str, intervals: bool) -> str:
    text = _fmt(metrics.get(key))
    if intervals and text != "-":
        low_key, high_key = _interval_keys(key)
        low, high = metrics.get(low_key), metrics.get(high_key)
        if isinstance(low, float) and isinstance(high, float) and not (math.isnan(low) or math.isnan(high)):
            text += f" [{low:.3f}, {high:.3f}]"
    return text


def _summary_rows(result: EvalResult) -> list[tuple[str, str]]:
    baseline = result.dump.get("robust", {}).get("baseline", result.methods[0].name)
    rows = list(SUMMARY_ROWS)
    if any(f"delta_worst_group_acc_vs_{baseline}" in m.metrics for m in result.methods):
        rows += [
            (f"worst - {baseline}", f"delta_worst_group_acc_vs_{baseline}"),
            (f"acc (train-w.) - {baseline}", f"delta_acc_train_weighted_vs_{baseline}"),
        ]
    return rows


def _table_lines(result: EvalResult, intervals: bool) -> list[str]:
    names = [m.name for m in result.methods]
    first = result.methods[0].metrics
    rows: list[list[str]] = []
    for group in result.group_names:
        count = first.get(f"group_count/{group}", 0.0)
        rows.append([group, str(int(count))] + [_cell(m.metrics, f"group_acc/{group}", intervals) for m in result.methods])
    summary = [[label, ""] + [_cell(m.metrics, key, intervals) for m in result.methods]
               for label, key in _summary_rows(result)]
    header = ["group", "n"] + names
    widths = [max(len(r[i]) for r in [header, *rows, *summary]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return [line(header), rule, *map(line, rows), rule, *map(line, summary)]


def format_table(result: EvalResult, width: int = TABLE_WIDTH) -> str:
    """Groups as rows (with their counts), methods as columns, then the summary rows.

    Cells carry their interval (``0.812 [0.710, 0.890]``) when the run has intervals and
    the table fits in ``width`` characters; otherwise point estimates only.
    """
    title = f"{result.dump['dataset']} [{result.dump['robust']['split']}]  model {result.dump['model']} / {result.dump['pretrained']}"
    settings = result.dump.get("robust", {}).get("intervals")
    lines = _table_lines(result, intervals=bool(settings))
    note = ""
    if settings:
        boot = (f"; bootstrap, {settings['bootstrap_samples']} resamples within groups, seed {settings['seed']}"
                if settings.get("bootstrap_samples") else "")
        note = f"[low, high]: {settings['ci_level']:.0%} intervals (Wilson for groups{boot})"
        if max(len(x) for x in lines) > width:
            lines = _table_lines(result, intervals=False)
            note = f"intervals ({settings['ci_level']:.0%}) left out to fit {width} columns: see the results JSON"
    return "\n".join([title, *lines, *([note] if note else [])])


def predictions_path(results_path: str) -> str:
    base = results_path[: -len(".json")] if results_path.endswith(".json") else results_path
    return base + "_predictions.csv"


def plot_path(results_path: str) -> str:
    base = results_path[: -len(".json")] if results_path.endswith(".json") else results_path
    return base + "_groups.png"


def _finite(value, path: tuple[str, ...], nulls: dict[str, str], metric_names: Sequence[str]):
    """``value`` with every NaN or infinity replaced by None, each recorded once in ``nulls``."""
    if isinstance(value, float) and not math.isfinite(value):
        if path[:1] == ("metrics",):
            key = path[1]
            owner = next((m for m in metric_names if key.startswith(m + "/")), None)
            relative = key[len(owner) + 1:] if owner else key
            if relative not in nulls:
                nulls[relative] = null_reason(relative)
        else:
            nulls.setdefault(".".join(path), f"not a finite number ({value})")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, (*path, str(k)), nulls, metric_names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, (*path, str(i)), nulls, metric_names) for i, v in enumerate(value)]
    return value


def standard_json(dump: dict) -> dict:
    """The results JSON as strict JSON: NaN and infinities become null, and ``robust.null_values``
    says once per quantity why (keys relative to the method: ``acc5``, ``group_acc/<g>``, or a dotted path)."""
    nulls: dict[str, str] = {}
    methods = sorted(dump.get("robust", {}).get("methods", {}), key=len, reverse=True)
    clean = _finite(dump, (), nulls, methods)
    if nulls:
        clean.setdefault("robust", {})["null_values"] = dict(sorted(nulls.items()))
    return clean


def _write_json(result: EvalResult, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(standard_json(result.dump), fh, indent=1, allow_nan=False)


def _write_predictions(result: EvalResult, path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "y", "group"] + [f"pred_{m.name}" for m in result.methods])
        for i, key in enumerate(result.keys):
            writer.writerow(
                [key, int(result.y[i]), result.group_names[result.groups[i]]] + [int(m.pred[i]) for m in result.methods]
            )


def _write_plot(result: EvalResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = result.group_names
    n_methods = len(result.methods)
    width = 0.8 / n_methods
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 1.5) + 2.5, 4))
    x = np.arange(len(groups))
    errors = False
    for j, method in enumerate(result.methods):
        accs = np.array([method.metrics.get(f"group_acc/{g}", math.nan) for g in groups], dtype=float)
        low = np.array([method.metrics.get(f"group_acc_ci_low/{g}", math.nan) for g in groups], dtype=float)
        high = np.array([method.metrics.get(f"group_acc_ci_high/{g}", math.nan) for g in groups], dtype=float)
        yerr = None
        if np.isfinite(low).any():
            errors = True
            yerr = np.nan_to_num(np.vstack([accs - low, high - accs]), nan=0.0).clip(min=0.0)
        wga = method.metrics.get("worst_group_acc", math.nan)
        ax.bar(x + (j - (n_methods - 1) / 2) * width, accs, width, yerr=yerr, capsize=2,
               error_kw={"elinewidth": 0.8}, label=f"{method.name} (worst {_fmt(wga)})")
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    settings = result.dump.get("robust", {}).get("intervals") or {}
    ax.set_ylabel(f"accuracy (bars: {settings.get('ci_level', 0.95):.0%} Wilson intervals)" if errors else "accuracy")
    ax.set_title(f"per-group accuracy: {result.dump['dataset']} ({result.dump['model']})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def state_path(results_path: str, method: str) -> str:
    base = results_path[: -len(".json")] if results_path.endswith(".json") else results_path
    return f"{base}_state_{method}.safetensors"


def _state_writer(method):
    def write(result: EvalResult, path: str) -> None:
        write_state(path, method.name, method.state, {**result.provenance, "hyperparameters": method.info["hyperparameters"]})

    return write


def write_outputs(
    result: EvalResult, results_path: str, predictions: bool = False, plot: bool = False, save_states: bool = False
) -> list[str]:
    """Write the JSON (and the CSV / PNG / fitted states when asked); all-or-nothing."""
    targets = [(results_path, _write_json)]
    if predictions:
        targets.append((predictions_path(results_path), _write_predictions))
    if plot:
        targets.append((plot_path(results_path), _write_plot))
    if save_states:
        targets += [(state_path(results_path, m.name), _state_writer(m)) for m in result.methods if m.state]
    base = results_path[: -len(".json")] if results_path.endswith(".json") else results_path
    targets += [(base + suffix, lambda _result, path, w=writer: w(path)) for suffix, writer in result.extra_files]
    return write_files([(target, functools.partial(writer, result)) for target, writer in targets])
