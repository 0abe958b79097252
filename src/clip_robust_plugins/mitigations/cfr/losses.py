"""CFR's loss terms, the cosine loss weight and the logit scale."""

from __future__ import annotations

import math

import torch

from .config import LEARNABLE_INIT


def cosine_weight(epoch: int, epochs: int) -> float:
    """The authors' loss weight ``c(e) = 1 + 0.5 * cos(2 pi e / E)`` (epochs counted from 0)."""
    return 1.0 + 0.5 * math.cos(2.0 * math.pi * epoch / epochs)


class LogitScale(torch.nn.Module):
    """``exp(log_scale)``: fixed (a buffer) or learnable (a parameter, the authors' 1/0.07 start)."""

    def __init__(self, value: float, learnable: bool):
        super().__init__()
        log = torch.tensor(math.log(value), dtype=torch.float32)
        if learnable:
            self.log_scale = torch.nn.Parameter(log)
        else:
            self.register_buffer("log_scale", log)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()


def make_logit_scale(setting: str, model_scale: float | None) -> LogitScale:
    """``setting`` is a number, ``model`` (``model_scale``) or ``learnable``."""
    if setting == "learnable":
        return LogitScale(LEARNABLE_INIT, learnable=True)
    if setting == "model":
        if model_scale is None:
            raise ValueError("cfr: --cfr_logit_scale model, but this model has no logit_scale")
        return LogitScale(model_scale, learnable=False)
    return LogitScale(float(setting), learnable=False)


def info_nce(anchor: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors and positives of CE([a.p_j, a.n_1..a.n_K] / tau, 0); inputs normalised.

    ``anchor`` (B, D), ``positives`` (B, P, D), ``negatives`` (B, K, D).
    """
    pos = torch.einsum("bd,bpd->bp", anchor, positives) / tau
    neg = torch.einsum("bd,bkd->bk", anchor, negatives) / tau
    logits = torch.cat([pos.unsqueeze(-1), neg.unsqueeze(1).expand(-1, pos.shape[1], -1)], dim=-1)
    return (torch.logsumexp(logits, dim=-1) - pos).mean()


def supcon(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over one batch of normalised ``z``."""
    n = len(z)
    sim = z @ z.T / tau
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, -float("inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y.unsqueeze(0) == y.unsqueeze(1)) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return z.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


def feature_dropout(h: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted dropout on ``h`` drawn from ``generator`` (CPU), so a seed reproduces it."""
    if p <= 0:
        return h
    keep = (torch.rand(h.shape, generator=generator) >= p).to(h.device)
    return h * keep / (1.0 - p)
