"""The report's figures, rendered to PNG bytes (so the HTML can embed them and nothing is half-written)."""

from __future__ import annotations

import io
import math

from .tables import Section

ERROR_NOTE = "error bars: std over seeds where a row has several runs, else the run's interval"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def _models(section: Section) -> list[str]:
    return list(dict.fromkeys(f"{r.model} / {r.pretrained}" for r in section.rows))


def _methods(section: Section) -> list[str]:
    ordered = sorted(section.rows, key=lambda r: not r.baseline)
    return list(dict.fromkeys(r.method for r in ordered))


def worst_group_png(section: Section) -> bytes:
    """Worst-group accuracy per method (x) and model (bars), with error bars."""
    import numpy as np

    plt = _pyplot()
    models, methods = _models(section), _methods(section)
    column = section.columns[0].title
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(8.5, 1.3 * len(methods) + 5.0), 4.2))
    x = np.arange(len(methods))
    for j, model in enumerate(models):
        heights, below, above = [], [], []
        for method in methods:
            row = next((r for r in section.rows if f"{r.model} / {r.pretrained}" == model and r.method == method), None)
            stat = row.stats[column] if row is not None else None
            if stat is None or not stat.values:
                heights.append(math.nan)
                below.append(0.0)
                above.append(0.0)
                continue
            lo, hi = stat.error()
            heights.append(stat.mean)
            below.append(lo)
            above.append(hi)
        ax.bar(x + (j - (len(models) - 1) / 2) * width, heights, width, yerr=[below, above], capsize=3,
               error_kw={"elinewidth": 0.9}, label=model)
    ax.set_xticks(x)
    ax.set_xticklabels(methods, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("worst-group accuracy")
    ax.set_title(f"{section.title}\n{ERROR_NOTE}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def scatter_png(section: Section) -> bytes:
    """Worst-group (y) against average accuracy (x) for every (model, method), with error bars."""
    plt = _pyplot()
    wga_col, avg_col = section.columns[0], section.columns[1]
    models, methods = _models(section), _methods(section)
    markers = "osD^v<>pPX*h"
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="worst = average")
    for row in section.rows:
        wga, avg = row.stats[wga_col.title], row.stats[avg_col.title]
        if not wga.values or not avg.values:
            continue
        model = f"{row.model} / {row.pretrained}"
        ylo, yhi = wga.error()
        xlo, xhi = avg.error()
        ax.errorbar(avg.mean, wga.mean, yerr=[[ylo], [yhi]], xerr=[[xlo], [xhi]], fmt=markers[models.index(model) % 12],
                    color=colors(methods.index(row.method) % 10), ms=7, capsize=2, elinewidth=0.8)
    for i, method in enumerate(methods):  # legend: colour = method, marker = model
        ax.plot([], [], "s", color=colors(i % 10), label=method)
    for i, model in enumerate(models):
        ax.plot([], [], markers[i % 12], color="black", mfc="none", label=model)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(avg_col.title)
    ax.set_ylabel(wga_col.title)
    ax.set_title(f"{section.title}\n{ERROR_NOTE}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def section_pngs(section: Section) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` of one section's figures."""
    return {
        f"{section.slug}_worst_group.png": worst_group_png(section),
        f"{section.slug}_worst_vs_average.png": scatter_png(section),
    }
