"""TPT's batched per-image tuning: confidence selection, the entropy of the marginal, and one
AdamW over one context row per image (SEraser's prompt encoder runs the text tower).

Each image's loss depends only on its own context row, so the gradient of the summed loss
with respect to row b is image b's own; AdamW is elementwise with a step count shared by all
rows, so one optimiser over the (B, n_ctx, width) tensor takes exactly the steps B
independent per-image optimisers would (tests/test_tpt.py checks it against the loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..seraser.text_tower import PromptEncoder
from .config import TptConfig


def view_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (...): the softmax entropy of each prediction."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def select_confident(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V, C) -> (B, k) indices of each image's ``k`` lowest-entropy views (ties: lower index first)."""
    return view_entropy(logits).argsort(dim=1, stable=True)[:, :k]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V, C) -> (B,): the entropy of the marginal ``mean_v softmax(logits_v)``, in log space
    (log-mean-exp of the views' log-probabilities, clamped away from -inf as the authors)."""
    logp = F.log_softmax(logits, dim=-1)
    log_mean = torch.logsumexp(logp, dim=1) - math.log(logits.shape[1])
    log_mean = log_mean.clamp_min(torch.finfo(log_mean.dtype).min)
    return -(log_mean.exp() * log_mean).sum(dim=-1)


@dataclass
class TuneResult:
    """What tuning one batch of images produced."""

    logits: torch.Tensor  # (B, C) of the original images with the tuned prompts
    untuned_logits: torch.Tensor  # (B, C) with the initial prompt
    loss_first: torch.Tensor  # (B,) marginal entropy of the kept views with the initial prompt
    loss_after: torch.Tensor  # (B,) the same with the tuned prompt
    original_kept: torch.Tensor  # (B,) bool: the image itself was among the kept views
    ctx_change: torch.Tensor  # (B,) ||ctx - ctx_0|| / ||ctx_0||


def tune_batch(
    encoder: PromptEncoder, image: torch.Tensor, views: torch.Tensor, config: TptConfig, scale: float,
) -> TuneResult:
    """Tune one context per image for B images at once (see the module docstring).

    ``image`` (B, D) and ``views`` (B, V, D) are normalised image features; the image is view 0
    of the set the confident views are chosen from (the authors' ``images[0]``).  The choice
    is made once, with the initial prompt (the authors' first step), and kept for later steps.
    """
    b = image.shape[0]
    init = encoder.init_ctx.to(image.device)
    candidates = torch.cat([image.unsqueeze(1), views], dim=1)  # (B, 1 + V, D)
    with torch.no_grad():
        base_text = encoder.encode(init.unsqueeze(0))[0]  # (C, D), the same for every image
        untuned = scale * image @ base_text.T
        idx = select_confident(scale * candidates @ base_text.T, min(config.n_selected, candidates.shape[1]))
        kept = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, candidates.shape[-1]))
        first = marginal_entropy(scale * kept @ base_text.T)
    ctx = init.unsqueeze(0).repeat(b, 1, 1).requires_grad_(True)
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.steps):
        text = encoder.encode(ctx)  # (B, C, D)
        loss = marginal_entropy(scale * torch.einsum("bvd,bcd->bvc", kept, text))
        (grad,) = torch.autograd.grad(loss.sum(), ctx)  # the sum: each row gets its own image's gradient
        ctx.grad = grad
        optimizer.step()
    with torch.no_grad():
        tuned = ctx.detach()
        text = encoder.encode(tuned)
        logits = scale * torch.einsum("bd,bcd->bc", image, text)
        after = marginal_entropy(scale * torch.einsum("bvd,bcd->bvc", kept, text))
        change = (tuned - init).flatten(1).norm(dim=1) / init.norm().clamp_min(1e-12)
    return TuneResult(
        logits.float().cpu(), untuned.float().cpu(), first.cpu(), after.cpu(), (idx == 0).any(dim=1).cpu(),
        change.cpu(),
    )
