"""The discovery sheet (PNG): the top cluster's regions, then images of the affected and harmed classes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ...datasets.base import SampleImage
from ..base import RunContext
from .split_discovery import DiscoveryRun


def collect_samples(ctx: RunContext, split: str, keys: set[str]) -> dict[str, SampleImage]:
    """The decoded samples of ``keys`` (one pass over the split, stopping once all are found)."""
    found: dict[str, SampleImage] = {}
    if not keys:
        return found
    for key, sample, _fields in ctx.dataset.samples(split, _WholeSample()):
        if key in keys:
            found[key] = sample
            if len(found) == len(keys):
                break
    return found


class _WholeSample:
    wants_sample = True

    def __call__(self, sample: SampleImage) -> SampleImage:
        return sample


def sheet_rows(run: DiscoveryRun, per_row: int = 5) -> list[tuple[str, list[tuple[int, int | None, str]]]]:
    """What the sheet shows: (row title, [(image row, region index or None, caption)])."""
    top = run.result.top_cluster
    if top is None:
        return []
    score = run.result.scores[top]
    cmap = run.result.cluster_map(run.regions.valid.shape)
    rows = [(f"top cluster {top}: regions by similarity to the medoid",
             [(i, r, f"{run.keys[i]}\nsim {sim:.2f}") for i, r, sim in run.top_regions(top, run.config.top_regions)])]
    names = run.classnames
    with_feature = (cmap == top).any(axis=1)
    affected = score.affected_class()
    if affected is not None:
        idx = np.flatnonzero(with_feature & (run.y == affected))[:per_row]
        rows.append((f"'{names[affected]}' images with the feature (accuracy {score.gaps[affected].acc_in:.2f} with, "
                     f"{score.gaps[affected].acc_out:.2f} without)",
                     [(i, _first_region(cmap[i], top), f"pred {names[run.pred[i]]}") for i in idx]))
    for c in score.harmed_classes():
        idx = np.flatnonzero(with_feature & (run.y == c) & (run.pred != run.y))[:per_row]
        rows.append((f"misclassified '{names[c]}' images with the feature (accuracy {score.gaps[c].acc_in:.2f} with, "
                     f"{score.gaps[c].acc_out:.2f} without)",
                     [(i, _first_region(cmap[i], top), f"pred {names[run.pred[i]]}") for i in idx]))
    return rows


def _first_region(row: np.ndarray, cluster: int) -> int | None:
    hits = np.flatnonzero(row == cluster)
    return int(hits[0]) if len(hits) else None


def write_sheet(path: str, run: DiscoveryRun, samples: Mapping[str, SampleImage]) -> None:
    """A PNG: the top cluster's regions (first row), then whole images of the affected and harmed classes
    with the cluster's region outlined, so a person sees the feature and what it does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = sheet_rows(run)
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"RaVL: no cluster passed the filters on {run.split} (k = {run.result.clustering.k})",
                ha="center", va="center")
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)
        return
    n_cols = max(len(items) for _, items in rows) or 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.7 * n_cols, 2.1 * len(rows)), squeeze=False)
    for r, (title, items) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(items):
                continue
            i, region, caption = items[c]
            sample = samples[run.keys[i]]
            box = run.regions.boxes[i, region].tolist() if region is not None else None
            if r == 0:
                ax.imshow(sample.image.crop(tuple(box)), interpolation="nearest")
            else:
                ax.imshow(sample.image, interpolation="nearest")
                if box is not None:
                    x0, y0, x1, y1 = box
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=2))
            ax.set_title(caption, fontsize=6)
        axes[r][0].text(0.0, 1.32, title, transform=axes[r][0].transAxes, fontsize=8, ha="left", va="bottom")
    fig.suptitle(f"RaVL discovery: {run.split} split, regions {run.proposer_config}", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.55 / (2.1 * len(rows)), hspace=0.75, wspace=0.15)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)

