"""``discover --compare``: the region-level discovery baselines against direct computations, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_robust_plugins.mitigations.ravl.baselines import (
    BaselineConfig,
    domino_mixture,
    domino_ranking,
    failure_direction_ranking,
    george_ranking,
    random_ranking,
)
from clip_robust_plugins.mitigations.ravl.clustering import unit_rows


def _planted(seed: int = 0, n: int = 40, d: int = 8):
    """Two classes, 2 regions per image; images 0..9 of class 0 carry a 'marker' region (direction e0)
    and are predicted as class 1.  Returns (emb (M, D), region_ids (M, 2), y, pred, marker (M,) bool)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    pred = y.copy()
    pred[:10] = 1
    ids = np.array([(i, r) for i in range(n) for r in range(2)])
    emb = rng.normal(scale=0.05, size=(len(ids), d))
    emb[:, 1 + (ids[:, 1] % 2) + 2 * y[ids[:, 0]]] += 1.0  # class- and region-specific content
    marker = (ids[:, 0] < 10) & (ids[:, 1] == 1)
    emb[marker] = rng.normal(scale=0.05, size=(marker.sum(), d))
    emb[marker, 0] += 1.0
    return emb, ids, y, pred, marker


def test_random_is_the_seeded_permutation():
    r = random_ranking(50, seed=3)
    assert r.regions.tolist() == np.random.default_rng([3, 0]).permutation(50).tolist()
    assert random_ranking(50, seed=4).regions.tolist() != r.regions.tolist()


def test_george_picks_the_cluster_of_errors_ranked_by_centroid_distance():
    emb, ids, y, pred, marker = _planted()
    r = george_ranking(emb, ids, y, pred, BaselineConfig(george_max_k=4), seed=0)
    assert set(r.regions.tolist()) == set(np.flatnonzero(marker).tolist())
    assert r.details["cluster"]["accuracy"] == 0.0 and r.details["cluster"]["predicted_class"] == 1
    unit = unit_rows(emb[r.regions])
    dist = np.linalg.norm(unit - unit.mean(0), axis=1)  # k-means centroid = the members' mean
    assert np.all(np.diff(dist) >= -1e-6)


def test_domino_mixture_without_label_terms_is_a_diagonal_gmm():
    """With both log-likelihood weights 0 the EM is sklearn's diagonal GaussianMixture from the same start."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (60, 3)), rng.normal(4, 0.5, (40, 3))])
    start = np.eye(2)[(x[:, 0] > 2).astype(int) ^ (rng.random(100) < 0.2)]
    cfg = BaselineConfig(domino_y_weight=0.0, domino_y_hat_weight=0.0, domino_reg_covar=1e-6)
    resp, _, _ = domino_mixture(x, np.eye(2)[np.zeros(100, int)], np.eye(2)[np.zeros(100, int)], start.astype(float), cfg)
    nk = start.sum(0)
    means = start.T @ x / nk[:, None]
    var = start.T @ x ** 2 / nk[:, None] - means ** 2 + 1e-6
    gmm = GaussianMixture(2, covariance_type="diag", reg_covar=1e-6, weights_init=nk / nk.sum(), means_init=means,
                          precisions_init=1 / var, tol=1e-3, max_iter=100).fit(x)
    np.testing.assert_allclose(resp, gmm.predict_proba(x), atol=1e-3)


def test_domino_top_slice_is_the_planted_error_slice():
    emb, ids, y, pred, marker = _planted()
    r = domino_ranking(emb, ids, y, pred, 2, BaselineConfig(domino_components=4, domino_pca=4), seed=0)
    assert r.details["init"] == "confusion" and r.details["slice_score"] > 0.5
    # every region of the top slice belongs to a misclassified image (class 0 predicted 1)
    assert len(r.regions) and all(y[ids[m, 0]] != pred[ids[m, 0]] for m in r.regions)


def test_failure_direction_ranks_the_marker_regions_first():
    emb, ids, y, pred, marker = _planted()
    r = failure_direction_ranking(emb, ids, y, pred, BaselineConfig(svm_folds=3), seed=0)
    assert r.details["class"] == 0 and set(r.details["per_class"]) == {"0"}  # class 1 has no errors
    assert marker[r.regions[:10]].all()


@pytest.mark.usefixtures("one_thread")
def test_discover_compare_reports_every_method(run_cli, quadrants_flags, tmp_path):
    out = tmp_path / "disc.json"
    rc, stdout, err = run_cli("discover", *quadrants_flags, "--feature_cache", tmp_path / "cache", "--output", out,
                              "--quiet", "--compare", "--seed", "2")
    assert rc == 0, err
    report = json.loads(out.read_text())
    entry = report["compare"]
    assert [m["method"] for m in entry["methods"]] == ["ravl", "random", "george", "domino", "distilling_failures"]
    assert entry["seed"] == 2 and all(m["seed"] == 2 for m in entry["methods"])
    assert entry["methods"][0]["precision@10"] == report["precision@10"]
    for m in entry["methods"]:
        assert isinstance(m["settings"], dict) and len(m["top_regions"]) == min(10, m["n_discovered_regions"])
        flags = [t["spurious"] for t in m["top_regions"]]
        assert m["precision@10"] == pytest.approx(np.mean(flags) if flags else 0.0, abs=1e-4)
    assert entry["spurious_region_share"] == pytest.approx(0.125, abs=0.02)  # one patch quadrant in half the images
    assert (tmp_path / "disc_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "distilling_failures" in stdout and "precision@10" in stdout
