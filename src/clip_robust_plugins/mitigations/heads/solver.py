"""Full-batch solvers for the robust linear heads (torch, CPU, deterministic).

Every head here is a softmax classifier ``z @ W.T + b`` on standardised features ``z``:
:func:`fit_softmax` minimises a weighted cross-entropy plus an L2 term with L-BFGS (warm
starts welcome), :func:`group_dro` runs GroupDRO's online exponentiated group weights with
full-batch steps.  Both work on the whole split at once: no per-sample Python loops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

#: below this many feature values (N x D) one torch thread is faster than several: the
#: threads' start-up and barriers dominate small matmuls, most of all on a busy machine
SMALL_PROBLEM = 1 << 22


@contextlib.contextmanager
def threads_for(z: np.ndarray) -> Iterator[None]:
    """One torch thread for the block when ``z`` is small, else torch's setting; restored after."""
    import torch

    saved = torch.get_num_threads()
    if z.size < SMALL_PROBLEM:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _tensors(z: np.ndarray, y: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64))


def fit_softmax(
    z: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    weights: np.ndarray | None = None,
    l2: float = 1e-4,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    anchor: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = 200,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Minimise ``sum_i w_i CE_i / sum_i w_i + l2 / 2 * |W - W0|^2`` (and ``+ l2 / 2 * |b - b0|^2``
    when an ``anchor`` ``(W0, b0)`` is given; without one ``W0 = 0`` and ``b`` is free).

    ``z`` (N, D), ``y`` (N,) in ``range(n_classes)``, ``weights`` (N,) non-negative (None:
    uniform).  ``init`` warm-starts the solver (default: the anchor, else zeros).  Returns
    ``(W (C, D), b (C,), {"iterations", "loss"})`` as float64 arrays.
    """
    import torch

    zt, yt = _tensors(z, y)
    n, d = zt.shape
    w = torch.full((n,), 1.0 / n) if weights is None else torch.from_numpy(np.asarray(weights, dtype=np.float32))
    w = w / w.sum()
    start = init if init is not None else anchor
    W = torch.zeros(n_classes, d) if start is None else torch.tensor(start[0], dtype=torch.float32)
    b = torch.zeros(n_classes) if start is None else torch.tensor(start[1], dtype=torch.float32)
    W.requires_grad_(True)
    b.requires_grad_(True)
    W0 = None if anchor is None else torch.tensor(anchor[0], dtype=torch.float32)
    b0 = None if anchor is None else torch.tensor(anchor[1], dtype=torch.float32)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)
    evaluations = [0]

    def objective() -> torch.Tensor:
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(torch.addmm(b, zt, W.T), yt, reduction="none")
        loss = (w * ce).sum()
        if W0 is None:
            loss = loss + 0.5 * l2 * (W * W).sum()
        else:
            loss = loss + 0.5 * l2 * (((W - W0) ** 2).sum() + ((b - b0) ** 2).sum())
        loss.backward()
        evaluations[0] += 1
        return loss

    with threads_for(zt.numpy()):
        opt.step(objective)
    state = opt.state[opt._params[0]]
    info = {"iterations": int(state.get("n_iter", 0)), "evaluations": evaluations[0]}
    return W.detach().double().numpy(), b.detach().double().numpy(), info


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


def group_dro(
    z: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    n_groups: int,
    *,
    eta: float = 1e-2,
    l2: float = 1e-4,
    steps: int = 500,
    lr_scale: float = 1.0,
    momentum: float = 0.9,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """GroupDRO (Sagawa et al. 2020, Algorithm 1) with full-batch steps.

    Each step: per-group mean cross-entropies ``L_g`` of the present groups;
    ``q_g <- q_g exp(eta L_g)``, renormalised; one Nesterov SGD step on
    ``sum_g q_g L_g + l2 / 2 |W|^2`` with learning rate ``lr_scale / L`` (``L``: the
    :func:`curvature_bound` plus ``l2``, so the step is stable whatever the features' scale).
    ``q`` starts uniform over the present groups (absent groups keep weight 0).
    Returns ``(W, b, {"group_weights", "final_group_losses", "curvature_bound", "lr"})``.
    """
    import torch

    zt, yt = _tensors(z, y)
    gt = torch.from_numpy(np.asarray(groups, dtype=np.int64))
    counts = torch.bincount(gt, minlength=n_groups).double()
    present = counts > 0
    q = present.double() / present.sum()
    W = torch.zeros(n_classes, zt.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    with threads_for(zt.numpy()):
        bound = curvature_bound(zt, gt, n_groups) + l2
        lr = lr_scale / bound
        opt = torch.optim.SGD([W, b], lr=lr, momentum=momentum, nesterov=momentum > 0)
        W, b, q, group_losses = _group_dro_steps(zt, yt, gt, q, W, b, opt, counts.clamp(min=1), eta, l2, steps)
    info = {
        "group_weights": q.tolist(),
        "final_group_losses": [round(float(v), 6) for v in group_losses.detach()],
        "curvature_bound": bound,
        "lr": lr,
    }
    return W.detach().double().numpy(), b.detach().double().numpy(), info


def _group_dro_steps(zt, yt, gt, q, W, b, opt, counts, eta, l2, steps):
    import torch

    n_groups = counts.numel()
    group_losses = torch.zeros(n_groups)
    for _ in range(steps):
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(torch.addmm(b, zt, W.T), yt, reduction="none")
        group_losses = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gt, ce.double()) / counts
        q = q * torch.exp(eta * group_losses.detach())
        q = q / q.sum()
        loss = (q * group_losses).sum() + 0.5 * l2 * (W.double() ** 2).sum()
        loss.backward()
        opt.step()
    return W, b, q, group_losses


def worst_group_acc(logits: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Accuracy of the worst non-empty group of ``argmax(logits)``."""
    from ...metrics import worst_group_accuracy

    return worst_group_accuracy(np.argmax(logits, axis=1), y, groups)
