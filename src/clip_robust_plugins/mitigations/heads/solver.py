"""Full-batch solvers for the robust linear heads (torch, CPU, deterministic).

Every head here is a softmax classifier ``z @ W.T + b`` on standardised features ``z``.
Both solvers fit K configurations (a hyperparameter grid) at once: their K heads are one
``(D, K * C)`` matrix, so a pass over the features serves them all (the matmuls are memory
bound: K heads cost about what one costs).  :func:`fit_softmax` minimises K weighted
cross-entropies plus L2 terms with one L-BFGS run over their (separable) sum;
:func:`group_dro` runs GroupDRO's online exponentiated group weights with full-batch steps.
No per-sample Python loops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread for the block, restored after.

    The heads' matmuls are skinny (N x D times D x C, C a handful of classes), so they are
    bound by memory bandwidth, not arithmetic: extra threads add start-up and barrier costs
    and, measured on a shared 2-core machine, made a full-batch step 1.2x (200,000 x 768) to
    4x (20,000 x 768) slower.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _tensors(z: np.ndarray, y: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64))


def _per_config_ce(zt, yt, W, b):
    """(N, K) cross-entropies of K heads ``W`` (K, C, D), ``b`` (K, C)."""
    import torch

    k, c, d = W.shape
    logits = torch.addmm(b.reshape(k * c), zt, W.reshape(k * c, d).T).view(-1, k, c)
    logp = torch.log_softmax(logits, dim=2)
    return -logp.gather(2, yt.view(-1, 1, 1).expand(-1, k, 1)).squeeze(2)


def fit_softmax(
    z: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    weights: np.ndarray | None = None,
    l2: float | Sequence[float] = 1e-4,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    anchor: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = 200,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """For each configuration k minimise
    ``sum_i w_ki CE_ki / sum_i w_ki + l2_k / 2 * |W_k - W0_k|^2`` (``+ l2_k / 2 * |b_k - b0_k|^2`` when
    an ``anchor`` ``(W0, b0)`` is given; without one ``W0 = 0`` and ``b`` is free).

    ``z`` (N, D), ``y`` (N,) in ``range(n_classes)``; ``weights`` (N,) or (K, N)
    non-negative (None: uniform); ``l2`` a number or K numbers; ``anchor``/``init`` one head
    ``(C, D), (C,)`` for all configurations or K heads ``(K, C, D), (K, C)``.  ``init``
    warm-starts the solver (default: the anchor, else zeros).  The objectives are separable,
    so their sum's minimiser is each one's minimiser.  Returns ``(W, b, info)`` as float64
    arrays, ``W`` (C, D) and ``b`` (C,) for a single configuration (a scalar ``l2`` and 1-d
    ``weights``), else (K, C, D) and (K, C).
    """
    import torch

    zt, yt = _tensors(z, y)
    n, d = zt.shape
    single = np.ndim(l2) == 0 and (weights is None or np.ndim(weights) == 1)
    l2s = np.atleast_1d(np.asarray(l2, dtype=np.float64))
    w = np.full((1, n), 1.0) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    k = max(len(l2s), len(w))
    w = torch.from_numpy(np.broadcast_to(w / w.sum(axis=1, keepdims=True), (k, n)).astype(np.float32).T.copy())
    l2t = torch.from_numpy(np.broadcast_to(l2s, (k,)).astype(np.float32).copy())

    def heads(pair):
        W0, b0 = (np.asarray(a, dtype=np.float32) for a in pair)
        return (torch.from_numpy(np.broadcast_to(W0, (k, n_classes, d)).copy()),
                torch.from_numpy(np.broadcast_to(b0, (k, n_classes)).copy()))

    start = init if init is not None else anchor
    W, b = heads(start) if start is not None else (torch.zeros(k, n_classes, d), torch.zeros(k, n_classes))
    W.requires_grad_(True)
    b.requires_grad_(True)
    W0, b0 = heads(anchor) if anchor is not None else (None, None)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)
    evaluations = [0]

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * _per_config_ce(zt, yt, W, b)).sum()
        if W0 is None:
            loss = loss + 0.5 * (l2t * (W * W).sum(dim=(1, 2))).sum()
        else:
            loss = loss + 0.5 * (l2t * (((W - W0) ** 2).sum(dim=(1, 2)) + ((b - b0) ** 2).sum(dim=1))).sum()
        loss.backward()
        evaluations[0] += 1
        return loss

    with one_thread():
        opt.step(objective)
    state = opt.state[opt._params[0]]
    info = {"configurations": k, "iterations": int(state.get("n_iter", 0)), "evaluations": evaluations[0]}
    W, b = W.detach().double().numpy(), b.detach().double().numpy()
    return (W[0], b[0], info) if single else (W, b, info)


def curvature_bound(zt, gt, n_groups: int, iterations: int = 100) -> float:
    """An upper bound on the curvature of any q-weighted mix of group mean cross-entropies:
    ``0.5 * max_g lambda_max([Z_g, 1]^T [Z_g, 1] / n_g)`` (softmax CE's Hessian in the logits is
    at most 1/2), each eigenvalue by power iteration from a fixed start (deterministic)."""
    import torch

    bound = 0.0
    for g in range(n_groups):
        zg = zt[gt == g]
        if len(zg) == 0:
            continue
        zg = torch.cat([zg, torch.ones(len(zg), 1)], dim=1)
        v = torch.ones(zg.shape[1]) / zg.shape[1] ** 0.5
        lam = 0.0
        for _ in range(iterations):
            u = zg.T @ (zg @ v) / len(zg)
            new = float(u.norm())
            v = u / new
            if abs(new - lam) <= 1e-7 * new:
                break
            lam = new
        bound = max(bound, 0.5 * new)
    return bound


Checkpoint = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


def group_dro(
    z: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    n_groups: int,
    *,
    eta: float = 1e-2,
    l2: Sequence[float] = (1e-4,),
    steps: int = 500,
    lr_scale: float = 1.0,
    momentum: float = 0.9,
    every: int = 0,
    checkpoint: Checkpoint | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """GroupDRO (Sagawa et al. 2020, Algorithm 1) with full-batch steps, one run per L2 value.

    Each step, for each of the K = ``len(l2)`` heads: per-group mean cross-entropies ``L_g``
    of the present groups; ``q_g <- q_g exp(eta L_g)``, renormalised; one Nesterov SGD step
    on ``sum_g q_g L_g + l2_k / 2 |W_k|^2`` with learning rate ``lr_scale / L`` (``L``: the
    :func:`curvature_bound` plus the largest ``l2``, so the step is stable whatever the
    features' scale).  ``q`` starts uniform over the present groups (absent groups keep
    weight 0).  ``checkpoint(step, W (K, C, D), b (K, C), q (K, G))`` is called every ``every`` steps
    (0: never) and after the last.  Returns the last ``(W, b)`` and
    ``{"group_weights" (K, G), "final_group_losses" (K, G), "curvature_bound", "lr"}``.
    """
    import torch

    zt, yt = _tensors(z, y)
    gt = torch.from_numpy(np.asarray(groups, dtype=np.int64))
    counts = torch.bincount(gt, minlength=n_groups).double()
    l2t = torch.tensor(list(l2), dtype=torch.float64)
    k = len(l2t)
    q = ((counts > 0).double() / (counts > 0).sum()).repeat(k, 1)  # (K, G)
    W = torch.zeros(k, n_classes, zt.shape[1], requires_grad=True)
    b = torch.zeros(k, n_classes, requires_grad=True)
    safe_counts = counts.clamp(min=1).view(-1, 1)
    group_losses = torch.zeros(n_groups, k, dtype=torch.float64)
    with one_thread():
        bound = curvature_bound(zt, gt, n_groups) + float(l2t.max())
        lr = lr_scale / bound
        opt = torch.optim.SGD([W, b], lr=lr, momentum=momentum, nesterov=momentum > 0)
        for step in range(1, steps + 1):
            opt.zero_grad()
            ce = _per_config_ce(zt, yt, W, b).double()  # (N, K)
            group_losses = torch.zeros(n_groups, k, dtype=torch.float64).index_add_(0, gt, ce) / safe_counts
            q = q * torch.exp(eta * group_losses.detach().T)
            q = q / q.sum(dim=1, keepdim=True)
            loss = (q * group_losses.T).sum() + 0.5 * (l2t * (W.double() ** 2).sum(dim=(1, 2))).sum()
            loss.backward()
            opt.step()
            if checkpoint is not None and ((every and step % every == 0) or step == steps):
                checkpoint(step, W.detach().double().numpy(), b.detach().double().numpy(), q.numpy().copy())
    info = {
        "group_weights": q.tolist(),
        "final_group_losses": group_losses.detach().T.tolist(),
        "curvature_bound": bound,
        "lr": lr,
    }
    return W.detach().double().numpy(), b.detach().double().numpy(), info


def worst_group_acc(logits: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Accuracy of the worst non-empty group of ``argmax(logits)``."""
    from ...accuracy import worst_group_accuracy

    return worst_group_accuracy(np.argmax(logits, axis=1), y, groups)
