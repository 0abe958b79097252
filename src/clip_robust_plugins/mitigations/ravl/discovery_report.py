"""The discovery report: a JSON-able dict (clusters, scores, top regions, checks, timings) and its summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .discovery import validity_check
from .split_discovery import DiscoveryRun

REPORT_FORMAT = "clip_robust_plugins.ravl_discovery/2"


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def clustering_entry(run: DiscoveryRun) -> dict[str, Any]:
    """How the regions were clustered: exact, or sampled (sample size, draws, seed)."""
    c = run.result.clustering
    entry: dict[str, Any] = {
        "algorithm": "FasterPAM (kmedoids), cosine distance clipped to [0, 1]",
        "init": run.config.kmedoids_init, "k_tried": sorted(c.silhouettes),
        "silhouettes": {str(k): _round(v) for k, v in sorted(c.silhouettes.items())}, "k": c.k,
        "max_cluster_regions": run.config.max_cluster_regions,
        "mode": "sampled" if c.sampled else "exact",
    }
    if c.sampled:
        entry.update({"sample_size": c.sample_size, "draws": c.draws, "sample_seed": c.seed,
                      "silhouette_on": "the sample of the kept draw",
                      "assignment": "every region to its nearest medoid (cosine)"})
    return entry


def build_report(run: DiscoveryRun, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The discovery report as a JSON-able dict (format :data:`REPORT_FORMAT`)."""
    res, names = run.result, run.classnames
    correct = run.pred == run.y
    clusters = []
    for s in res.scores:
        medoid = res.region_ids[res.clustering.medoids[s.cluster]]
        clusters.append({
            "cluster": s.cluster, "n_regions": s.n_regions, "n_images": s.n_images,
            "performance_gap": _round(s.performance_gap), "influence": _round(s.influence),
            "spurious_pattern": s.spurious_pattern, "kept": s.kept,
            "rank": res.ranking.index(s.cluster) if s.kept else None,
            "affected_class": names[s.affected_class()] if s.affected_class() is not None else None,
            "harmed_classes": [names[c] for c in s.harmed_classes()],
            "per_class": {names[c]: {"acc_with": _round(g.acc_in), "n_with": g.n_in, "acc_without": _round(g.acc_out),
                                     "n_without": g.n_out, "weight": _round(g.weight), "gap": _round(g.gap)}
                          for c, g in sorted(s.gaps.items())},
            "medoid": {"key": run.keys[medoid[0]], "region": int(medoid[1]),
                       "box": run.regions.boxes[medoid[0], medoid[1]].tolist()},
        })
    top = res.top_cluster
    top_entry = None
    if top is not None:
        score = res.scores[top]
        top_entry = {
            "cluster": top,
            "affected_class": names[score.affected_class()] if score.affected_class() is not None else None,
            "harmed_classes": [names[c] for c in score.harmed_classes()],
            "performance_gap": _round(score.performance_gap), "influence": _round(score.influence),
            "top_regions": [{"key": run.keys[i], "region": r, "box": run.regions.boxes[i, r].tolist(),
                             "similarity": _round(sim), "class": names[run.y[i]], "predicted": names[run.pred[i]]}
                            for i, r, sim in run.top_regions(top, run.config.top_regions)],
        }
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        **provenance,
        "split": run.split, "seed": run.seed,
        "labels_used": ["class"],
        "regions": {"proposer": run.proposer_name, "config": run.proposer_config,
                    "per_image": int(run.regions.valid.shape[1]), "n_images": len(run.keys),
                    "n_regions": int(run.regions.valid.sum())},
        "classnames": names,
        "image_accuracy": _round(correct.mean()),
        "per_class_accuracy": {n: _round(correct[run.y == c].mean()) if (run.y == c).any() else None
                               for c, n in enumerate(names)},
        "clustering": clustering_entry(run),
        "influence_threshold": run.config.influence_threshold,
        "ranked_clusters": res.ranking,
        "top_cluster": top_entry,
        "clusters": clusters,
    }
    if run.regions.truth is not None:
        report["precision@10"] = _round(run.precision(10))
        report["validity"] = validity_check(run.pred, run.y, run.regions.present, names)
    report["seconds"] = dict(run.seconds)
    return report



def write_json(report: Mapping[str, Any], path: str) -> None:
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)


def format_summary(report: Mapping[str, Any], json_path: str, png_path: str) -> str:
    """What ``discover`` prints: the chosen clustering, the top cluster, the checks."""
    lines = [f"RaVL discovery on {report['dataset']} [{report['split']}], {report['model']}/{report['pretrained']}: "
             f"{report['regions']['n_regions']} regions ({report['regions']['config']}) of "
             f"{report['regions']['n_images']} images, image accuracy {report['image_accuracy']:.3f}",
             f"k = {report['clustering']['k']} (silhouette {report['clustering']['silhouettes'][str(report['clustering']['k'])]:.3f}); "
             f"{len(report['ranked_clusters'])} cluster(s) kept"]
    top = report["top_cluster"]
    if top is None:
        lines.append("no cluster has H >= threshold and both a positive and a negative class gap")
    else:
        lines.append(f"top cluster {top['cluster']}: G = {top['performance_gap']:.3f}, H = {top['influence']:.3f}, "
                     f"affected class {top['affected_class']!r}, harmed {top['harmed_classes']}")
        entry = report["clusters"][top["cluster"]]
        for name, row in entry["per_class"].items():
            lines.append(f"  {name}: accuracy {row['acc_with']:.3f} with the feature ({row['n_with']}), "
                         f"{row['acc_without']:.3f} without ({row['n_without']})")
    if "precision@10" in report:
        v = report["validity"]
        lines.append(f"precision@10 = {report['precision@10']:.2f}; validity check: "
                     f"{'valid' if v['valid'] else 'NOT valid'} (gaps: favoured {v.get('favoured_class')!r} "
                     f"{v.get('favoured_gap', float('nan')):+.3f}, other classes {v.get('other_classes_gap', float('nan')):+.3f})")
    lines.append(f"discovery took {report['seconds']['discovery_total']:.1f} s; wrote {json_path} and {png_path}")
    return "\n".join(lines)

