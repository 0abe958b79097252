"""The numerical cores of the text-side methods, on plain numpy arrays (no model, no torch).

Each function is the formula of the authors' code (see docs/methods/<name>.md); the
mitigation modules only build prompts, encode them and call these.
"""

from __future__ import annotations

import numpy as np


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def orth_projection(spurious: np.ndarray, rtol: float = 1e-8) -> np.ndarray:
    """P0 = I - V (V^T V)^-1 V^T for V = spurious^T (d, k): removes the span of the spurious
    prompt embeddings (rows of ``spurious``).  Computed from an SVD basis so a rank-deficient
    set (repeated prompts) removes only its span."""
    _, s, vt = np.linalg.svd(np.asarray(spurious, dtype=np.float64), full_matrices=False)
    basis = vt[s > rtol * s.max()].T  # (d, r), orthonormal
    return np.eye(basis.shape[0]) - basis @ basis.T


def pair_matrix(embeddings: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """M = mean over pairs (i, j) of (z_i - z_j)(z_i - z_j)^T (Orth-Cali's calibration matrix)."""
    z = np.asarray(embeddings, dtype=np.float64)
    diff = np.stack([z[i] - z[j] for i, j in pairs])
    return diff.T @ diff / len(pairs)


def calibrated_projection(p0: np.ndarray, m: np.ndarray, lam: float) -> np.ndarray:
    """P = P0 (lambda M + I)^-1 (Orth-Cali's closed form; lambda = 0 gives P0)."""
    g = lam * m + np.eye(m.shape[0])
    return np.linalg.solve(g.T, p0.T).T


def project_queries(queries: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Class text embeddings (C, d) -> normalise(q P^T)."""
    return _normalize(np.asarray(queries, dtype=np.float64) @ p.T)


def orthonormal_directions(pairs_a: np.ndarray, pairs_b: np.ndarray, rtol: float = 1e-8) -> np.ndarray:
    """RoboShot: QR of the difference vectors a_k - b_k, (r, d) orthonormal rows; columns
    with a vanishing R diagonal (dependent differences) are dropped."""
    diff = np.asarray(pairs_a, dtype=np.float64) - np.asarray(pairs_b, dtype=np.float64)
    q, r = np.linalg.qr(diff.T)
    keep = np.abs(np.diag(r)) > rtol * max(np.abs(np.diag(r)).max(), 1e-300)
    return q[:, keep].T


def roboshot_transform(x: np.ndarray, reject: np.ndarray, accept: np.ndarray) -> np.ndarray:
    """Normalise x, then for each reject direction v: x <- normalise(x - (x.v) v); then for
    each accept direction: x <- normalise(x + (x.v) v) (the authors' loop)."""
    x = _normalize(np.asarray(x, dtype=np.float64))
    for v in reject:
        x = _normalize(x - (x @ v)[:, None] * v[None, :])
    for v in accept:
        x = _normalize(x + (x @ v)[:, None] * v[None, :])
    return x


def group_scores(group_logits: np.ndarray, n_classes: int, reduce: str = "max") -> np.ndarray:
    """(N, C*K) logits of (class, value) prompts, class-major -> (N, C) class scores: max or
    log-sum-exp over each class's K prompts."""
    g = np.asarray(group_logits, dtype=np.float64).reshape(len(group_logits), n_classes, -1)
    if reduce == "max":
        return g.max(axis=2)
    if reduce == "logsumexp":
        top = g.max(axis=2, keepdims=True)
        return (top + np.log(np.exp(g - top).sum(axis=2, keepdims=True)))[..., 0]
    raise ValueError(f"unknown reduction {reduce!r} (max or logsumexp)")


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=axis, keepdims=True))


def perception_log_probs(joint_logits: np.ndarray, n_classes: int, temperature: float,
                         context_logits: np.ndarray | None = None) -> np.ndarray:
    """PerceptionCLIP, log p(y|x) from f(y, z; x) (N, C*Z, class-major).

    p(z|x) is proportional to sum_y exp(f(y,z;x)/T) (or softmax_z of ``context_logits``/T,
    the class-free variant); p(y|x,z) = softmax_y f(y,z;x); p(y|x) = sum_z p(y|x,z) p(z|x).
    Computed in log space so scale-100 logits never overflow.
    """
    f = np.asarray(joint_logits, dtype=np.float64).reshape(len(joint_logits), n_classes, -1)  # N, Y, Z
    if context_logits is None:
        log_pz = _log_softmax(_logsumexp(f / temperature, axis=1), axis=1)  # N, Z
    else:
        log_pz = _log_softmax(np.asarray(context_logits, dtype=np.float64) / temperature, axis=1)
    log_py_given_z = _log_softmax(f, axis=1)  # N, Y, Z
    return _logsumexp(log_py_given_z + log_pz[:, None, :], axis=2)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.exp(x - top).sum(axis=axis))


def tie_scales(x: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TIE*: infer each image's spurious value (argmax cosine to the normalised value
    directions (S, d)); scale_s = mean cos(x, t_s) over the images inferred as s (0 where none).
    Returns (scales (S,), counts (S,))."""
    x = _normalize(np.asarray(x, dtype=np.float64))
    t = _normalize(np.asarray(directions, dtype=np.float64))
    cos = x @ t.T
    inferred = cos.argmax(axis=1)
    scales = np.zeros(len(t))
    counts = np.bincount(inferred, minlength=len(t))
    for s in range(len(t)):
        if counts[s]:
            scales[s] = cos[inferred == s, s].mean()
    return scales, counts


def tie_transform(x: np.ndarray, directions: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """TIE*: x <- x/|x| - scale_s t_s for the inferred value s (t_s normalised)."""
    x = _normalize(np.asarray(x, dtype=np.float64))
    t = _normalize(np.asarray(directions, dtype=np.float64))
    inferred = (x @ t.T).argmax(axis=1)
    return x - scales[inferred][:, None] * t[inferred]
