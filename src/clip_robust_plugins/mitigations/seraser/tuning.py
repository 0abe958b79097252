"""The batched per-image tuning: the losses, one AdamW over one context per image, and what
the tuning did (how far the context moved, how far the text features turned).

Each image's loss depends only on its own context row, so the gradient of the summed loss
with respect to row b is image b's own gradient; AdamW is elementwise with a step count
shared by all rows, so one optimiser over the (B, n_ctx, width) tensor takes exactly the
steps B independent ones would (``docs/methods/seraser.md``; tested against the loop).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import SEraserConfig
from .text_tower import PromptEncoder


@contextlib.contextmanager
def cpu_threads(n: int, device: str | torch.device):
    """``torch.set_num_threads(n)`` for the block when running on a CPU (n > 0), then restored."""
    if n <= 0 or torch.device(device).type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def background_loss(logits: torch.Tensor) -> torch.Tensor:
    """(B, V, C) -> (B,): ``KL(uniform || softmax)`` averaged over the V views."""
    logp = F.log_softmax(logits, dim=-1)
    return (-math.log(logits.shape[-1]) - logp.mean(dim=-1)).mean(dim=-1)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """(B, V, C) -> (B,): the prediction's entropy averaged over the V views."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean(dim=-1)


def kl_to_reference(logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(B, V, C) -> (B,): ``KL(p_ref || p)`` averaged over the V views (``ref_logp`` fixed)."""
    logp = F.log_softmax(logits, dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).mean(dim=-1)


@dataclass
class TuneResult:
    """What tuning one batch of images produced."""

    logits: torch.Tensor  # (B, C) of the raw images with the tuned prompts
    untuned_logits: torch.Tensor  # (B, C) with the initial prompts
    loss_first: torch.Tensor  # (B,) loss at the first step (NaN when steps == 0)
    loss_last: torch.Tensor  # (B,) loss at the last step
    ctx_change: torch.Tensor  # (B,) ||ctx - ctx_0|| / ||ctx_0|| (Frobenius over n_ctx x width)
    text_cosine: torch.Tensor  # (B,) the lowest cosine, over classes, of tuned and untuned text features


def tune_batch(
    encoder: PromptEncoder,
    raw: torch.Tensor,
    foreground: torch.Tensor,
    background: torch.Tensor,
    config: SEraserConfig,
    scale: float,
) -> TuneResult:
    """Tune one context per image for B images at once; see the module docstring for why
    this equals B independent per-image runs.

    ``raw`` (B, D), ``foreground`` (B, Vf, D), ``background`` (B, Vb, D): normalised image
    features (the black image already among the background views).  ``scale`` is a float.
    """
    b = raw.shape[0]
    init = encoder.init_ctx.to(raw.device)
    with torch.no_grad():
        base_text = encoder.encode(init.unsqueeze(0))[0]  # (C, D), the same for every image
        untuned = scale * raw @ base_text.T
        ref_logp = F.log_softmax(scale * foreground @ base_text.T, dim=-1) if config.fg_loss == "kl" else None
    ctx = init.unsqueeze(0).repeat(b, 1, 1).requires_grad_(True)
    optimizer = torch.optim.AdamW([ctx], lr=config.lr, weight_decay=config.weight_decay)
    nan = torch.full((b,), float("nan"))
    first, last = nan, nan
    for step in range(config.steps):
        text = encoder.encode(ctx)  # (B, C, D)
        loss = config.bg_weight * background_loss(scale * torch.einsum("bvd,bcd->bvc", background, text))
        fg_logits = scale * torch.einsum("bvd,bcd->bvc", foreground, text)
        fg = entropy_loss(fg_logits) if ref_logp is None else kl_to_reference(fg_logits, ref_logp)
        loss = loss + config.fg_weight * fg
        (grad,) = torch.autograd.grad(loss.sum(), ctx)  # the sum: each row gets its own image's gradient
        ctx.grad = grad
        optimizer.step()
        if step == 0:
            first = loss.detach().cpu()
        last = loss.detach().cpu()
    with torch.no_grad():
        tuned = ctx.detach()
        text = encoder.encode(tuned)
        logits = scale * torch.einsum("bd,bcd->bc", raw, text)
        change = (tuned - init).flatten(1).norm(dim=1) / init.norm().clamp_min(1e-12)
        cosine = torch.einsum("bcd,cd->bc", text, base_text).min(dim=1).values
    return TuneResult(logits.float().cpu(), untuned.float().cpu(), first, last, change.cpu(), cosine.float().cpu())


def summary(values: torch.Tensor) -> dict[str, float]:
    """Mean, min, median and max of a 1-D tensor (JSON-able), for the results' diagnostics."""
    v = values.float()
    if v.numel() == 0:
        return {}
    return {"mean": float(v.mean()), "min": float(v.min()), "median": float(v.median()), "max": float(v.max())}


def margins(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N,): the top logit minus the runner-up."""
    top = logits.topk(min(2, logits.shape[1]), dim=1).values
    return top[:, 0] - top[:, -1]

