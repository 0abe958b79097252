"""The text-side methods' formulas against direct computations on small cases."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from clip_robust_plugins.mitigations.text import linalg


def test_orth_projection_matches_closed_form():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(3, 7))
    v = b.T
    closed = np.eye(7) - v @ np.linalg.inv(v.T @ v) @ v.T
    assert np.allclose(linalg.orth_projection(b), closed)
    # a repeated prompt removes nothing more
    assert np.allclose(linalg.orth_projection(np.vstack([b, b[:1]])), closed)


def test_calibrated_projection_minimises_the_objective():
    rng = np.random.default_rng(1)
    d, lam = 5, 3.0
    z = rng.normal(size=(4, d))
    pairs = [(0, 1), (2, 3)]
    p0 = linalg.orth_projection(rng.normal(size=(2, d)))
    m = linalg.pair_matrix(z, pairs)
    diffs = [z[i] - z[j] for i, j in pairs]
    assert np.allclose(m, sum(np.outer(t, t) for t in diffs) / 2)

    def objective(flat):
        p = flat.reshape(d, d)
        return np.sum((p - p0) ** 2) + lam * np.mean([np.sum((p @ t) ** 2) for t in diffs])

    found = minimize(objective, p0.ravel(), method="L-BFGS-B", options={"gtol": 1e-12, "maxiter": 5000}).x
    assert np.allclose(linalg.calibrated_projection(p0, m, lam), found.reshape(d, d), atol=1e-5)
    assert np.allclose(linalg.calibrated_projection(p0, m, 0.0), p0)


def test_roboshot_by_hand():
    x = np.array([[3.0, 4.0, 0.0]])
    a, b = np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 0.0]])
    out = linalg.roboshot_transform(x, linalg.orthonormal_directions(a, b), np.zeros((0, 3)))
    assert np.allclose(out, [[0.0, 1.0, 0.0]])
    accept = linalg.orthonormal_directions(np.array([[0.0, 2.0, 0.0]]), np.zeros((1, 3)))
    out = linalg.roboshot_transform(np.array([[1.0, 1.0, 0.0]]), np.zeros((0, 3)), accept)
    # by hand: x = (1,1)/sqrt2, x.v = 1/sqrt2, x + (x.v) v = (1/sqrt2, 2/sqrt2) -> (1, 2)/sqrt5
    expected = np.array([1.0, 2.0, 0.0]) / np.sqrt(5)
    assert np.allclose(out[0], expected)


def test_group_scores_max_and_logsumexp():
    g = np.array([[1.0, 5.0, 2.0, 3.0]])  # class 0: (1, 5), class 1: (2, 3)
    assert np.allclose(linalg.group_scores(g, 2, "max"), [[5.0, 3.0]])
    assert np.allclose(linalg.group_scores(g, 2, "logsumexp"), [[np.log(np.e + np.e**5), np.log(np.e**2 + np.e**3)]])


def test_perception_marginalisation_vs_direct_sum():
    rng = np.random.default_rng(2)
    n, c, z, t = 5, 3, 2, 0.7
    f = rng.normal(size=(n, c * z)) * 3
    ff = f.reshape(n, c, z)
    pz = np.exp(ff / t).sum(axis=1)
    pz /= pz.sum(axis=1, keepdims=True)
    py_z = np.exp(ff) / np.exp(ff).sum(axis=1, keepdims=True)
    direct = np.einsum("nyz,nz->ny", py_z, pz)
    assert np.allclose(np.exp(linalg.perception_log_probs(f, c, t)), direct)
    # scale-100 logits stay finite
    assert np.isfinite(linalg.perception_log_probs(f * 100, c, t)).all()


def test_tie_recovers_a_planted_direction():
    rng = np.random.default_rng(3)
    d = 16
    t = np.eye(d)[:2]  # value directions
    core = np.eye(d)[2]
    a = rng.integers(0, 2, size=200)
    x = core + 0.8 * t[a] + 0.05 * rng.normal(size=(200, d))
    scales, counts = linalg.tie_scales(x, t)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for s in range(2):
        assert counts[s] == np.sum(a == s)
        assert np.isclose(scales[s], xn[a == s, s].mean())
    out = linalg.tie_transform(x, t, scales)
    # the planted spurious component is (on average) removed
    assert abs(out[:, :2].sum(axis=1).mean()) < 0.05
