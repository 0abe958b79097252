"""RaVL discovery on precomputed arrays (numpy only; no model, no group labels).

Clusters the valid regions (see :mod:`.clustering`), then scores every cluster as the
authors' ``identify`` does: per-class accuracy gaps with/without the feature (``G_c``) and
the influence ``H_c``; see docs/methods/ravl.md for the definitions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .clustering import CHUNK, Clustering, cluster_bounded, k_candidates, unit_rows
from .configs import DiscoveryConfig


@dataclass(frozen=True)
class ClassGap:
    """One class's accuracy on images with and without a cluster's feature."""

    n_in: int
    acc_in: float
    n_out: int
    acc_out: float

    @property
    def weight(self) -> float:
        return 2.0 * min(self.n_in, self.n_out) / (self.n_in + self.n_out)

    @property
    def gap(self) -> float:
        """``w_y (p_in - p_out)``: the weighted class performance gap."""
        return self.weight * (self.acc_in - self.acc_out)


def class_gaps(with_feature: np.ndarray, y: np.ndarray, pred: np.ndarray) -> dict[int, ClassGap]:
    """Per class occurring among the images with the feature: accuracy with vs without it."""
    gaps: dict[int, ClassGap] = {}
    correct = pred == y
    for c in np.unique(y[with_feature]):
        inside = with_feature & (y == c)
        outside = ~with_feature & (y == c)
        if not inside.any() or not outside.any():
            continue
        gaps[int(c)] = ClassGap(int(inside.sum()), float(correct[inside].mean()), int(outside.sum()),
                                float(correct[outside].mean()))
    return gaps


def top_regions_for_prediction(region_scores: np.ndarray, valid: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per image, the valid region scoring highest for the image's predicted class (-1: fewer than 2 regions)."""
    scores = region_scores[np.arange(len(pred)), :, pred]  # (N, R): each region's score for the predicted class
    scores = np.where(valid, scores, -np.inf)
    top = scores.argmax(axis=1)
    return np.where(valid.sum(axis=1) >= 2, top, -1)


def influence_score(in_cluster: np.ndarray, top: np.ndarray, y: np.ndarray, pred: np.ndarray,
                    gaps: Mapping[int, ClassGap]) -> float | None:
    """``H_c``: among misclassified images with the feature whose class has a negative gap, the
    share whose top region lies in the cluster, per class, maximised over classes (None if no such image)."""
    with_feature = in_cluster.any(axis=1)
    shares = []
    for c, g in gaps.items():
        if g.gap >= 0:
            continue
        images = np.flatnonzero(with_feature & (y == c) & (pred != y) & (top >= 0))
        if len(images):
            shares.append(float(in_cluster[images, top[images]].mean()))
    return max(shares) if shares else None


@dataclass(frozen=True)
class ClusterScore:
    """RaVL's scores of one cluster."""

    cluster: int
    n_regions: int
    n_images: int
    gaps: dict[int, ClassGap]
    performance_gap: float  # G_c
    influence: float | None  # H_c
    spurious_pattern: bool  # a positive and a negative class gap
    kept: bool

    def affected_class(self) -> int | None:
        positive = [(g.gap, c) for c, g in self.gaps.items() if g.gap > 0]
        return max(positive)[1] if positive else None

    def harmed_classes(self) -> list[int]:
        return sorted(c for c, g in self.gaps.items() if g.gap < 0)


@dataclass(frozen=True)
class Discovery:
    """The outcome of discovery on one split: clusters, their scores, the ranking."""

    clustering: Clustering
    region_ids: np.ndarray  # (M, 2): (image row, region index) of each clustered region
    scores: list[ClusterScore]
    ranking: list[int]  # kept clusters, best first
    ranked_regions: dict[int, np.ndarray]  # kept cluster -> clustered-region indices, most medoid-like first
    similarity: np.ndarray  # (M,) cosine similarity of each region to its cluster's medoid
    top_region: np.ndarray  # (N,) top region for the predicted class (-1: none)

    @property
    def top_cluster(self) -> int | None:
        return self.ranking[0] if self.ranking else None

    def cluster_map(self, shape: tuple[int, int]) -> np.ndarray:
        """(N, R) cluster id of every region (-1 for invalid ones)."""
        out = np.full(shape, -1, dtype=np.int64)
        out[self.region_ids[:, 0], self.region_ids[:, 1]] = self.clustering.labels
        return out


def _clustered(region_emb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(M, D) embeddings of the valid regions: a view when every region is valid (no copy)."""
    if valid.all():
        return region_emb.reshape(-1, region_emb.shape[-1])
    return region_emb[valid]


def medoid_similarity(emb: np.ndarray, clustering: Clustering, chunk: int = CHUNK) -> np.ndarray:
    """(M,) cosine similarity of each region to its cluster's medoid, in chunks."""
    medoid_unit = unit_rows(emb[clustering.medoids])
    out = np.empty(len(emb), dtype=np.float32)
    for start in range(0, len(emb), chunk):
        block = unit_rows(emb[start:start + chunk])
        out[start:start + chunk] = np.einsum("md,md->m", block, medoid_unit[clustering.labels[start:start + chunk]])
    return out


def discover_from_embeddings(region_emb: np.ndarray, valid: np.ndarray, y: np.ndarray, pred: np.ndarray,
                             region_scores: np.ndarray, n_classes: int, config: DiscoveryConfig, seed: int,
                             progress: bool = False) -> Discovery:
    """RaVL discovery on precomputed arrays (no model, no group labels).

    ``region_emb`` (N, R, D) region embeddings, ``valid`` (N, R) bool, ``y`` (N,) class
    labels, ``pred`` (N,) zero-shot image predictions, ``region_scores`` (N, R, C)
    per-region class probabilities.  Above ``config.max_cluster_regions`` regions the
    clustering is sampled (memory O(cap^2), not O(M^2)).
    """
    region_ids = np.argwhere(valid)
    emb = _clustered(region_emb, valid)
    ks = k_candidates(n_classes, len(emb))
    if not ks:
        raise ValueError(f"{len(emb)} regions are too few to try 2|Y| = {2 * n_classes} clusters")
    clustering = cluster_bounded(emb, ks, seed, config.max_cluster_regions, config.cluster_draws,
                                 config.kmedoids_init, config.kmedoids_max_iter, progress)
    cmap = np.full(valid.shape, -1, dtype=np.int64)
    cmap[region_ids[:, 0], region_ids[:, 1]] = clustering.labels
    top = top_regions_for_prediction(region_scores, valid, pred)
    similarity = medoid_similarity(emb, clustering)
    scores = []
    for c in range(clustering.k):
        in_cluster = cmap == c
        with_feature = in_cluster.any(axis=1)
        gaps = class_gaps(with_feature, y, pred)
        h = influence_score(in_cluster, top, y, pred, gaps)
        pattern = any(g.gap > 0 for g in gaps.values()) and any(g.gap < 0 for g in gaps.values())
        scores.append(ClusterScore(
            cluster=c, n_regions=int(in_cluster.sum()), n_images=int(with_feature.sum()), gaps=gaps,
            performance_gap=float(sum(abs(g.gap) for g in gaps.values())), influence=h, spurious_pattern=pattern,
            kept=pattern and h is not None and h >= config.influence_threshold,
        ))
    ranking = sorted((s.cluster for s in scores if s.kept), key=lambda c: (-scores[c].performance_gap, c))
    ranked_regions = {}
    for c in ranking:
        members = np.flatnonzero(clustering.labels == c)
        ranked_regions[c] = members[np.lexsort((members, -similarity[members]))]
    return Discovery(clustering, region_ids, scores, ranking, ranked_regions, similarity, top)


def precision_at_k(ranked: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Share of the first ``k`` ranked regions that are labelled spurious (fewer regions: of those)."""
    head = np.asarray(ranked[:k])
    return float(truth[head].mean()) if len(head) else 0.0


def validity_check(pred: np.ndarray, y: np.ndarray, present: np.ndarray, classnames: Sequence[str],
                   threshold: float = 0.10) -> dict[str, Any]:
    """RaVL's check that the model learned the planted correlation (needs image-level ground truth).

    ``gap_y = acc(y | feature present) - acc(y | absent)``.  The favoured class is the one
    with the largest gap; the setting is valid when its gap exceeds ``threshold`` and the
    pooled gap of all other classes is below ``-threshold``.
    """
    correct = pred == y
    gaps: dict[str, Any] = {}
    for c, name in enumerate(classnames):
        w, wo = (y == c) & present, (y == c) & ~present
        if w.any() and wo.any():
            gaps[name] = {"acc_with": float(correct[w].mean()), "n_with": int(w.sum()),
                          "acc_without": float(correct[wo].mean()), "n_without": int(wo.sum()),
                          "gap": float(correct[w].mean() - correct[wo].mean())}
    if not gaps:
        return {"valid": False, "reason": "no class has images both with and without the feature", "classes": gaps}
    favoured = max(gaps, key=lambda name: gaps[name]["gap"])
    fav = classnames.index(favoured)
    others_w, others_wo = (y != fav) & present, (y != fav) & ~present
    pooled = float(correct[others_w].mean() - correct[others_wo].mean()) if others_w.any() and others_wo.any() else 0.0
    return {
        "valid": bool(gaps[favoured]["gap"] > threshold and pooled < -threshold),
        "threshold": threshold,
        "favoured_class": favoured,
        "favoured_gap": gaps[favoured]["gap"],
        "other_classes_gap": pooled,
        "classes": gaps,
    }

