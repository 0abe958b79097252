"""The report's figures, rendered to PNG bytes (so the HTML can embed them and nothing is half-written)."""

from __future__ import annotations

import io
import math

from .tables import Section

ERROR_NOTE = "error bars: std over seeds where a row has several runs, else the run's interval"
#: points closer than this (in accuracy, both axes) share one label in the scatter
SAME_POINT = 0.002


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
    return list(dict.fromkeys(r.name for r in ordered))


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
            row = next((r for r in section.rows if f"{r.model} / {r.pretrained}" == model and r.name == method), None)
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


def groups_png(section: Section) -> bytes:
    """Accuracy of every group (x) for every row (bars), with error bars."""
    import numpy as np

    plt = _pyplot()
    groups, rows = list(section.groups), section.rows
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(min(12.0, max(8.5, 0.25 * len(rows) * len(groups) + 4.0)), 4.4))
    x = np.arange(len(groups))
    colors, methods = plt.get_cmap("tab10"), _methods(section)
    for j, row in enumerate(rows):
        stats = [row.groups[g] for g in groups]
        heights = [s.mean if s.values else math.nan for s in stats]
        errors = np.array([s.error() for s in stats]).T
        ax.bar(x + (j - (len(rows) - 1) / 2) * width, heights, width, yerr=errors, capsize=2,
               error_kw={"elinewidth": 0.7}, label=section.display(row), color=colors(methods.index(row.name) % 10))
    ax.set_xticks(x)
    ax.set_xticklabels([f"{g}\n(n={section.counts.get(g, '?')})" for g in groups], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("group accuracy")
    ax.set_title(f"{section.title}: accuracy per group\n{ERROR_NOTE} (Wilson per group)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def forest_png(section: Section) -> bytes:
    """Each method's worst-group difference from the baseline, with its paired interval (or std over seeds)."""
    plt = _pyplot()
    column = section.columns[3].title
    rows = [r for r in section.rows if not r.baseline and r.stats[column].values]
    fig, ax = plt.subplots(figsize=(8.5, max(2.2, 0.45 * len(rows) + 1.4)))
    for i, row in enumerate(reversed(rows)):
        stat = row.stats[column]
        below, above = stat.error()
        above_zero = stat.mean - below > 0 if (stat.n == 1 and stat.has_interval) else None
        color = {True: "tab:green", False: "tab:grey", None: "tab:blue"}[above_zero]
        ax.errorbar(stat.mean, i, xerr=[[below], [above]], fmt="o", color=color, capsize=3, ms=6)
        ax.annotate(f"{stat.text()}", (stat.mean + above, i), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([section.display(r) for r in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, max(len(rows), 1) - 0.3)
    ax.set_xlabel(f"worst-group accuracy minus {section.baseline}'s")
    ax.set_title(f"{section.title}: difference from {section.baseline}\nbars: the paired bootstrap interval "
                 "of one run (green: above zero), or the std over seeds", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def label_clusters(points: list[tuple[float, float, str]], tolerance: float = SAME_POINT) -> list[tuple[float, float, str]]:
    """Points on one spot (closer than ``tolerance`` in both coordinates) merged, their labels joined with " = "."""
    clusters: list[list[tuple[float, float, str]]] = []
    for point in points:
        home = next((c for c in clusters if abs(c[0][0] - point[0]) <= tolerance and abs(c[0][1] - point[1]) <= tolerance),
                    None)
        (home.append(point) if home is not None else clusters.append([point]))
    return [(c[0][0], c[0][1], " = ".join(p[2] for p in c)) for c in clusters]


#: label offsets (points) to choose from, so labels of nearby points go different ways
_OFFSETS = ((10, 10), (10, -16), (-10, 10), (-10, -16), (16, -3), (-16, -3), (0, 20), (0, -24))


def place_labels(anchors: list[tuple[float, float]], scale: tuple[float, float]) -> list[tuple[int, int]]:
    """An offset per anchor (in points), each as far as possible from the other points and the labels placed so far.

    ``scale``: points per data unit on x and y, so distances compare on the page.
    """
    placed: list[tuple[float, float]] = []
    out = []
    others = [(x * scale[0], y * scale[1]) for x, y in anchors]
    for x, y in anchors:
        px, py = x * scale[0], y * scale[1]

        def clearance(offset, px=px, py=py):
            tx, ty = px + offset[0], py + offset[1]
            near = [(tx - ox) ** 2 + (ty - oy) ** 2 for ox, oy in others if (ox, oy) != (px, py)]
            near += [4 * ((tx - lx) ** 2 + (ty - ly) ** 2) for lx, ly in placed]  # labels repel more
            return min(near, default=math.inf)

        best = max(_OFFSETS, key=clearance)
        placed.append((px + best[0], py + best[1]))
        out.append(best)
    return out


def scatter_png(section: Section) -> bytes:
    """Worst-group (y) against average accuracy (x) for every row, error bars, every point labelled.

    Rows on one point share one label naming all of them (``erm_head = zeroshot``), so no two
    methods are indistinguishable.
    """
    plt = _pyplot()
    wga_col, avg_col = section.columns[0], section.columns[1]
    models, methods = _models(section), _methods(section)
    markers = "osD^v<>pPX*h"
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8.0, 5.6))
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="worst = average")
    points: list[tuple[float, float, str]] = []
    for row in section.rows:
        wga, avg = row.stats[wga_col.title], row.stats[avg_col.title]
        if not wga.values or not avg.values:
            continue
        model = f"{row.model} / {row.pretrained}"
        ylo, yhi = wga.error()
        xlo, xhi = avg.error()
        ax.errorbar(avg.mean, wga.mean, yerr=[[ylo], [yhi]], xerr=[[xlo], [xhi]], fmt=markers[models.index(model) % 12],
                    color=colors(methods.index(row.name) % 10), ms=7, capsize=2, elinewidth=0.8, alpha=0.9)
        points.append((avg.mean, wga.mean, section.display(row)))
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    xlim = (max(0.0, min(xs) - 0.1), min(1.02, max(xs) + 0.1))
    ylim = (max(0.0, min(ys) - 0.1), min(1.02, max(ys) + 0.1))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    labels = label_clusters(points)
    scale = (5.0 * 72 / (xlim[1] - xlim[0]), 4.3 * 72 / (ylim[1] - ylim[0]))  # the axes are about 5 x 4.3 inches
    for (x, y, text), (dx, dy) in zip(labels, place_labels([(x, y) for x, y, _ in labels], scale)):
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                    ha="left" if dx > 0 else ("center" if dx == 0 else "right"),
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"},
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    for i, method in enumerate(methods):  # legend: colour = method, marker = model
        ax.plot([], [], "s", color=colors(i % 10), label=method)
    for i, model in enumerate(models):
        ax.plot([], [], markers[i % 12], color="black", mfc="none", label=model)
    ax.set_xlabel(avg_col.title)
    ax.set_ylabel(wga_col.title)
    ax.set_title(f"{section.title}\n{ERROR_NOTE};\nmethods on one spot share a label (a = b)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


FIGURES = (
    ("worst_group", "worst-group accuracy", worst_group_png),
    ("groups", "accuracy per group", groups_png),
    ("forest", "difference from the baseline in worst-group accuracy", forest_png),
    ("worst_vs_average", "worst-group vs average accuracy", scatter_png),
)


def figure_names(section: Section) -> list[tuple[str, str]]:
    """``(file name, alt text)`` of a section's figures, in page order."""
    return [(f"{section.slug}_{suffix}.png", alt) for suffix, alt, _ in FIGURES]


def section_pngs(section: Section) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` of one section's figures."""
    return {f"{section.slug}_{suffix}.png": draw(section) for suffix, _, draw in FIGURES}
