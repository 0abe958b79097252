"""``discover --compare``: RaVL beside region-level discovery baselines on the same regions and model.

Every method ranks the same clustered regions (the run's region embeddings, class labels and
zero-shot predictions); precision@10 is computed once, the same way, for all of them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .baselines import (
    BaselineConfig,
    Ranking,
    domino_ranking,
    failure_direction_ranking,
    george_ranking,
    random_ranking,
)
from .discovery import precision_at_k
from .split_discovery import DiscoveryRun

K = 10
METHODS = ("ravl", "random", "george", "domino", "distilling_failures")
DESCRIPTIONS = {
    "ravl": "RaVL: K-Medoids over regions, clusters scored by G_c and H_c, top cluster by medoid similarity",
    "random": "a seeded random ranking of every region",
    "george": "George-style: per predicted class, k-means on unit region embeddings, k by silhouette; the "
              "cluster of lowest image accuracy, regions by distance to its centroid",
    "domino": "Domino-style: PCA, then an error-aware Gaussian mixture over region embeddings x image class x "
              "image prediction; the slice of largest |p(pred) - p(class)|, regions by membership",
    "distilling_failures": "Distilling-Failures-style: per class, a linear SVM predicting the image's error from "
                           "the region embedding; the class best predicted, regions by out-of-fold decision value",
}


def _ravl_ranking(run: DiscoveryRun) -> Ranking:
    top = run.result.top_cluster
    regions = run.result.ranked_regions[top] if top is not None else np.empty(0, dtype=np.int64)
    return Ranking(regions, {"top_cluster": top, "k": run.result.clustering.k})


def rankings(run: DiscoveryRun, config: BaselineConfig) -> dict[str, tuple[Ranking, float]]:
    """Every method's ranking of the run's clustered regions, with its seconds."""
    ids = run.result.region_ids
    emb = run.region_emb[ids[:, 0], ids[:, 1]]
    n_classes = len(run.classnames)
    makers = {
        "ravl": lambda: _ravl_ranking(run),
        "random": lambda: random_ranking(len(ids), run.seed),
        "george": lambda: george_ranking(emb, ids, run.y, run.pred, config, run.seed),
        "domino": lambda: domino_ranking(emb, ids, run.y, run.pred, n_classes, config, run.seed),
        "distilling_failures": lambda: failure_direction_ranking(emb, ids, run.y, run.pred, config, run.seed),
    }
    out = {}
    for name in METHODS:
        t0 = time.perf_counter()
        ranking = makers[name]()
        out[name] = (ranking, time.perf_counter() - t0)
    return out


def _settings(name: str, run: DiscoveryRun, config: BaselineConfig) -> dict[str, Any]:
    c = config.asdict()
    if name == "ravl":
        return dataclasses.asdict(run.config)
    if name == "george":
        return {k: c[k] for k in ("george_max_k", "silhouette_sample", "kmeans_n_init")}
    if name == "domino":
        return {k: c[k] for k in c if k.startswith("domino_")}
    if name == "distilling_failures":
        return {"svm_cs": c["svm_cs"], "svm_folds": c["svm_folds"], "class_weight": "balanced"}
    return {}


def compare_entry(run: DiscoveryRun, config: BaselineConfig | None = None) -> dict[str, Any]:
    """The ``compare`` section of the discovery report (precision@10 needs region labels)."""
    if run.regions.truth is None:
        raise ValueError("--compare needs region labels (--ravl_truth_key) to compute precision@10")
    config = config or BaselineConfig()
    ids = run.result.region_ids
    truth = run.regions.truth[ids[:, 0], ids[:, 1]]
    methods = []
    for name, (ranking, seconds) in rankings(run, config).items():
        head = ranking.regions[:K]
        methods.append({
            "method": name, "description": DESCRIPTIONS[name],
            f"precision@{K}": round(precision_at_k(ranking.regions, truth, K), 4),
            "n_discovered_regions": len(ranking.regions), "seed": run.seed,
            "settings": _settings(name, run, config), "chosen": ranking.details,
            "top_regions": [{"key": run.keys[ids[m, 0]], "region": int(ids[m, 1]), "spurious": bool(truth[m])}
                            for m in head],
            "seconds": round(seconds, 3),
        })
    return {"k": K, "seed": run.seed, "labels_used": ["class"],
            "region_labels": "precision@10 only", "n_regions": len(ids),
            "spurious_region_share": round(float(truth.mean()), 4), "methods": methods}


def format_table(entry: Mapping[str, Any]) -> str:
    """The terminal table of ``--compare``."""
    rows = [(m["method"], f"{m[f'precision@{K}']:.2f}", str(m["n_discovered_regions"]), f"{m['seconds']:.2f}")
            for m in entry["methods"]]
    head = ("method", f"precision@{K}", "regions found", "seconds")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    line = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [f"discovery baselines on the same {entry['n_regions']} regions (seed {entry['seed']}; "
           f"share of spurious regions {entry['spurious_region_share']:.2f}):", line(head),
           "  ".join("-" * w for w in widths)]
    return "\n".join(out + [line(r) for r in rows])


def write_figure(entry: Mapping[str, Any], path: str, title: str) -> None:
    """Bar chart of precision@10 per method (PNG), the spurious-region share as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [m["method"] for m in entry["methods"]]
    values = [m[f"precision@{K}"] for m in entry["methods"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.bar(names, values, color=["tab:red" if n == "ravl" else "tab:gray" for n in names])
    ax.axhline(entry["spurious_region_share"], color="k", ls="--", lw=1, label="share of spurious regions")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"precision@{K}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
