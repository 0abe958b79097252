"""K-Medoids over region embeddings: exact FasterPAM up to a cap, CLARA-style sampling above it.

Exact (M regions <= cap): FasterPAM on the full (M, M) cosine-distance matrix for every K,
silhouette on the same matrix (the authors' protocol).  Sampled (M > cap): per K and draw,
FasterPAM on a seeded sample of ``cap`` regions, every region assigned to its nearest
medoid in chunks, the draw of lowest total distance over all regions kept, and the
silhouette computed on that draw's sample.  Memory is O(cap^2 + M k), never O(M^2).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: rows per block when every region is compared with the medoids
CHUNK = 8192


@dataclass(frozen=True)
class Clustering:
    """K-Medoids result over the clustered (valid) regions."""

    labels: np.ndarray  # (M,) cluster id of each region
    medoids: np.ndarray  # (k,) region index of each cluster's medoid
    silhouettes: dict[int, float]  # K -> silhouette, for every K tried
    #: sampled path: regions per sample, draws per K and the sampling seed (None: exact)
    sample_size: int | None = None
    draws: int | None = None
    seed: int | None = None

    @property
    def k(self) -> int:
        return len(self.medoids)

    @property
    def sampled(self) -> bool:
        return self.sample_size is not None


def k_candidates(n_classes: int, n_points: int) -> list[int]:
    """RaVL's sweep ``2|Y| .. 5|Y| - 1``, limited to K < number of regions (silhouette needs it)."""
    return [k for k in range(2 * n_classes, 5 * n_classes) if 2 <= k < n_points]


def unit_rows(emb: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows."""
    emb = np.asarray(emb, dtype=np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def cosine_distances(emb: np.ndarray) -> np.ndarray:
    """``1 - cos`` of L2-normalised rows, clipped to [0, 1], zero diagonal (the authors' matrix), float32."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    unit = unit.astype(np.float32, copy=False)
    dist = unit @ unit.T
    np.subtract(1.0, dist, out=dist)  # in place: one (n, n) float32 matrix at the peak
    np.clip(dist, 0.0, 1.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _pam(dist: np.ndarray, k: int, seed: int, init: str, max_iter: int):
    import kmedoids

    # n_cpu=1: the parallel variant's result may depend on thread timing
    result = kmedoids.fasterpam(dist, k, max_iter=max_iter, init=init, random_state=seed, n_cpu=1)
    return np.asarray(result.labels, dtype=np.int64), np.asarray(result.medoids, dtype=np.int64)


def _silhouette(dist: np.ndarray, labels: np.ndarray) -> float:
    import kmedoids

    return float(kmedoids.silhouette(dist, labels, n_cpu=1)[0])


def _bar(items, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="K", disable=not progress, file=sys.stderr, leave=False)


def cluster_regions(emb: np.ndarray, ks: Sequence[int], seed: int, init: str = "random", max_iter: int = 100,
                    progress: bool = False) -> Clustering:
    """Exact: FasterPAM for every K in ``ks`` on cosine distances; keep the K with the best silhouette."""
    if not ks:
        raise ValueError("no number of clusters to try")
    dist = cosine_distances(emb)
    best = None
    silhouettes: dict[int, float] = {}
    for k in _bar(ks, "ravl: k-medoids", progress):
        labels, medoids = _pam(dist, k, seed, init, max_iter)
        score = _silhouette(dist, labels)
        silhouettes[k] = score
        if best is None or score > best[0]:
            best = (score, labels, medoids)
    return Clustering(labels=best[1], medoids=best[2], silhouettes=silhouettes)


def nearest_medoids(emb: np.ndarray, medoid_unit: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``emb``, the index of the nearest medoid (normalised rows) and its cosine distance, in chunks."""
    labels = np.empty(len(emb), dtype=np.int64)
    dist = np.empty(len(emb), dtype=np.float32)
    for start in range(0, len(emb), chunk):
        sims = unit_rows(emb[start:start + chunk]) @ medoid_unit.T
        labels[start:start + chunk] = sims.argmax(1)
        dist[start:start + chunk] = np.clip(1.0 - sims.max(1), 0.0, 1.0)
    return labels, dist


def cluster_regions_sampled(emb: np.ndarray, ks: Sequence[int], seed: int, sample_size: int, draws: int = 1,
                            init: str = "random", max_iter: int = 100, progress: bool = False) -> Clustering:
    """CLARA-style: FasterPAM on seeded samples of ``sample_size`` regions, all regions assigned to the nearest
    medoid; per K the draw of lowest total distance wins, the K of best sample silhouette is kept."""
    if not ks:
        raise ValueError("no number of clusters to try")
    n = len(emb)
    samples = [np.sort(np.random.default_rng([seed, draw]).choice(n, size=min(sample_size, n), replace=False))
               for draw in range(draws)]
    per_k: dict[int, tuple] = {}  # K -> (total distance, labels, medoids, sample silhouette) of the best draw
    for idx in samples:  # one (sample_size, sample_size) matrix at a time, shared by every K
        dist = cosine_distances(emb[idx])
        for k in _bar(ks, "ravl: sampled k-medoids", progress):
            _, local = _pam(dist, k, seed, init, max_iter)
            medoids = idx[local]
            labels, d = nearest_medoids(emb, unit_rows(emb[medoids]))
            cost = float(d.sum(dtype=np.float64))
            if k not in per_k or cost < per_k[k][0]:
                sample_labels = labels[idx]
                score = _silhouette(dist, sample_labels) if len(np.unique(sample_labels)) > 1 else -1.0
                per_k[k] = (cost, labels, medoids, score)
        del dist
    best = None
    silhouettes: dict[int, float] = {}
    for k in ks:
        _, labels, medoids, score = per_k[k]
        silhouettes[k] = score
        if best is None or score > best[0]:
            best = (score, labels, medoids)
    return Clustering(labels=best[1], medoids=best[2], silhouettes=silhouettes, sample_size=min(sample_size, n),
                      draws=draws, seed=seed)


def cluster_bounded(emb: np.ndarray, ks: Sequence[int], seed: int, max_regions: int, draws: int = 1,
                    init: str = "random", max_iter: int = 100, progress: bool = False) -> Clustering:
    """Exact clustering up to ``max_regions`` regions, sampled above (memory bounded by the cap)."""
    if len(emb) <= max_regions:
        return cluster_regions(emb, ks, seed, init, max_iter, progress)
    return cluster_regions_sampled(emb, ks, seed, max_regions, draws, init, max_iter, progress)
