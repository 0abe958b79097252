"""Discovery baselines applied to regions (numpy + scikit-learn; no model, no group labels).

Each baseline returns a :class:`Ranking` of the clustered regions (indices into the (M, D)
valid-region embeddings), best first, so precision@10 is computed for every method the
same way as for RaVL.  Every region inherits its image's class label, zero-shot prediction
and error (``pred != y``): the error signal of the image-level methods.  How each method was
adapted to regions is written in docs/methods/ravl.md ("Discovery baselines").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .clustering import unit_rows


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the discovery baselines of ``discover --compare`` (recorded in the JSON)."""

    #: George: k swept over 2..george_max_k per predicted class, chosen by silhouette
    george_max_k: int = 10
    #: George: silhouette on a seeded sample of at most this many regions (never quadratic in M)
    silhouette_sample: int = 2000
    kmeans_n_init: int = 3
    #: Domino (the authors' DominoSlicer defaults)
    domino_components: int = 25
    domino_pca: int = 128
    domino_y_weight: float = 1.0
    domino_y_hat_weight: float = 1.0
    domino_max_iter: int = 100
    domino_reg_covar: float = 1e-6
    #: Distilling Failures: C of the linear SVM chosen by grouped cross-validation
    svm_cs: tuple[float, ...] = (0.01, 0.1, 1.0)
    svm_folds: int = 5

    def asdict(self) -> dict[str, Any]:
        out = asdict(self)
        out["svm_cs"] = list(self.svm_cs)
        return out


@dataclass(frozen=True)
class Ranking:
    """A baseline's discovered group of regions, best first, and what it chose along the way."""

    regions: np.ndarray  # clustered-region indices, best first
    details: dict[str, Any]


def _image_of(region_ids: np.ndarray, per_image: np.ndarray) -> np.ndarray:
    return per_image[region_ids[:, 0]]


def random_ranking(n_regions: int, seed: int) -> Ranking:
    """Random: a seeded permutation of every region."""
    order = np.random.default_rng([seed, 0]).permutation(n_regions)
    return Ranking(order, {"rng": f"numpy.random.default_rng([{seed}, 0]).permutation"})


def _silhouette(x: np.ndarray, labels: np.ndarray, sample: int, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    size = min(sample, len(x))
    return float(silhouette_score(x, labels, metric="euclidean", sample_size=size, random_state=seed))


def george_ranking(emb: np.ndarray, region_ids: np.ndarray, y: np.ndarray, pred: np.ndarray,
                   config: BaselineConfig, seed: int) -> Ranking:
    """George-style: per predicted class, k-means on the unit region embeddings, k by silhouette;
    the cluster of lowest image accuracy over all classes is the discovered subgroup, its regions
    ranked by distance to the centroid."""
    from sklearn.cluster import KMeans

    unit = unit_rows(emb)
    rpred, correct = _image_of(region_ids, pred), _image_of(region_ids, pred == y)
    best: tuple | None = None  # (accuracy, -size, class, k, members, distances)
    chosen: dict[str, Any] = {}
    for c in np.unique(rpred):
        members = np.flatnonzero(rpred == c)
        ks = [k for k in range(2, config.george_max_k + 1) if k < len(members)]
        fits = []
        for k in ks:
            km = KMeans(n_clusters=k, n_init=config.kmeans_n_init, random_state=seed).fit(unit[members])
            if len(np.unique(km.labels_)) < 2:
                continue
            fits.append((_silhouette(unit[members], km.labels_, config.silhouette_sample, seed), k, km))
        if not fits:
            continue
        score, k, km = max(fits, key=lambda f: (f[0], -f[1]))
        chosen[str(int(c))] = {"k": k, "silhouette": round(score, 4)}
        dist = np.linalg.norm(unit[members] - km.cluster_centers_[km.labels_], axis=1)
        for j in range(k):
            inside = km.labels_ == j
            cand = (float(correct[members[inside]].mean()), -int(inside.sum()), int(c), j, members[inside], dist[inside])
            if best is None or cand[:4] < best[:4]:
                best = cand
    if best is None:
        return Ranking(np.empty(0, dtype=np.int64), {"per_predicted_class": chosen, "cluster": None})
    acc, _, c, j, members, dist = best
    order = members[np.lexsort((members, dist))]
    return Ranking(order, {"per_predicted_class": chosen, "cluster": {"predicted_class": c, "cluster": j,
                                                                      "accuracy": round(acc, 4), "n_regions": len(members)}})


def _diag_log_gauss(x: np.ndarray, means: np.ndarray, var: np.ndarray) -> np.ndarray:
    """(M, K) log N(x | mean_k, diag var_k), without the (M, K, D) tensor."""
    prec = 1.0 / var
    quad = (x ** 2) @ prec.T - 2.0 * x @ (means * prec).T + (means ** 2 * prec).sum(1)
    return -0.5 * (quad + np.log(var).sum(1) + x.shape[1] * np.log(2 * np.pi))


def domino_mixture(x: np.ndarray, y1: np.ndarray, yhat: np.ndarray, resp: np.ndarray, config: BaselineConfig):
    """EM of Domino's error-aware mixture: diagonal Gaussians over ``x`` times categoricals over the
    class (``y1``, one-hot) and the prediction (``yhat``), each raised to its log-likelihood weight.
    Starts from the responsibilities ``resp``; returns (resp, y_probs, y_hat_probs)."""
    from scipy.special import logsumexp

    eps = 1e-10
    prev = -np.inf
    for _ in range(config.domino_max_iter):
        nk = resp.sum(0) + eps
        means = resp.T @ x / nk[:, None]
        var = resp.T @ (x ** 2) / nk[:, None] - means ** 2 + config.domino_reg_covar
        var = np.maximum(var, config.domino_reg_covar)
        y_probs, yhat_probs = resp.T @ y1 / nk[:, None], resp.T @ yhat / nk[:, None]
        log = (_diag_log_gauss(x, means, var) + np.log(nk / nk.sum())
               + config.domino_y_weight * y1 @ np.log(y_probs + eps).T
               + config.domino_y_hat_weight * yhat @ np.log(yhat_probs + eps).T)
        norm = logsumexp(log, axis=1, keepdims=True)
        resp = np.exp(log - norm)
        bound = float(norm.mean())
        if abs(bound - prev) < 1e-3:
            break
        prev = bound
    nk = resp.sum(0) + eps
    return resp, resp.T @ y1 / nk[:, None], resp.T @ yhat / nk[:, None]


def domino_ranking(emb: np.ndarray, region_ids: np.ndarray, y: np.ndarray, pred: np.ndarray, n_classes: int,
                   config: BaselineConfig, seed: int) -> Ranking:
    """Domino-style: PCA of the unit region embeddings, the error-aware mixture over them, the
    image's class and its (hard) prediction; the top slice is the component whose predicted-class
    distribution differs most from its class distribution; its regions ranked by membership."""
    from sklearn.decomposition import PCA

    unit = unit_rows(emb)
    n_comp = min(config.domino_pca, unit.shape[1], len(unit) - 1)
    x = PCA(n_components=n_comp, random_state=seed).fit_transform(unit).astype(np.float64)
    eye = np.eye(n_classes)
    y1, yhat = eye[_image_of(region_ids, y)], eye[_image_of(region_ids, pred)]
    k = min(config.domino_components, len(unit))
    rng = np.random.default_rng([seed, 1])
    if k >= n_classes ** 2:  # the authors' "confusion" start: one component per (class, prediction) cell
        cells = (y1[:, :, None] * yhat[:, None, :]).reshape(len(x), -1)
        resp = np.tile(cells, (1, -(-k // n_classes ** 2)))[:, :k]
        init = "confusion"
    else:
        resp = np.eye(k)[rng.integers(0, k, len(x))]
        init = "random"
    resp = resp + rng.random(resp.shape) * 1e-3
    resp /= resp.sum(1, keepdims=True)
    resp, y_probs, yhat_probs = domino_mixture(x, y1, yhat, resp, config)
    score = np.abs(yhat_probs - y_probs).max(1)
    top = int(np.lexsort((np.arange(k), -score))[0])
    members = np.flatnonzero(resp.argmax(1) == top)
    order = members[np.lexsort((members, -resp[members, top]))]
    return Ranking(order, {"init": init, "n_components": k, "pca_components": n_comp, "slice": top,
                           "slice_score": round(float(score[top]), 4), "n_regions": len(members)})


def failure_direction_ranking(emb: np.ndarray, region_ids: np.ndarray, y: np.ndarray, pred: np.ndarray,
                              config: BaselineConfig, seed: int) -> Ranking:
    """Distilling-Failures-style: per class, a linear SVM on the unit region embeddings predicting the
    image's error (C by grouped cross-validation, class-balanced); out-of-fold decision values rank the
    regions of the class whose error is best predicted (balanced accuracy)."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.svm import LinearSVC

    unit = unit_rows(emb)
    ry, wrong, image = _image_of(region_ids, y), _image_of(region_ids, pred != y).astype(int), region_ids[:, 0]
    best: tuple | None = None
    per_class: dict[str, Any] = {}
    for c in np.unique(ry):
        members = np.flatnonzero(ry == c)
        n_wrong_images = len(np.unique(image[members][wrong[members] == 1]))
        n_right_images = len(np.unique(image[members][wrong[members] == 0]))
        folds = min(config.svm_folds, n_wrong_images, n_right_images)
        if folds < 2:
            continue
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = list(cv.split(unit[members], wrong[members], image[members]))
        fits = []
        for C in config.svm_cs:
            value = np.empty(len(members))
            for train, test in splits:
                if len(np.unique(wrong[members[train]])) < 2:  # a fold without both outcomes: no direction
                    value[test] = 0.0
                    continue
                svm = LinearSVC(C=C, class_weight="balanced", random_state=seed)
                value[test] = svm.fit(unit[members[train]], wrong[members[train]]).decision_function(unit[members[test]])
            fits.append((balanced_accuracy_score(wrong[members], value > 0), -C, value))
        score, neg_c, value = max(fits, key=lambda f: (f[0], f[1]))
        per_class[str(int(c))] = {"C": -neg_c, "balanced_accuracy": round(float(score), 4), "folds": folds}
        if best is None or score > best[0]:
            best = (score, int(c), members, value)
    if best is None:
        return Ranking(np.empty(0, dtype=np.int64), {"per_class": per_class, "class": None})
    _, c, members, value = best
    return Ranking(members[np.lexsort((members, -value))], {"per_class": per_class, "class": c})
