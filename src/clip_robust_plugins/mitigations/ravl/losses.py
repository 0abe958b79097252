"""The fine-tuning losses: CLIP loss, L_R (region -> label), L_A (label -> regions), and the
caption parser that gives each caption its class (definitions: docs/methods/ravl.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def parse_caption_labels(captions: Sequence[str], classnames: Sequence[str]) -> list[int]:
    """The class each caption names (the longest class name found as whole words; -1 if none or ambiguous)."""
    patterns = [(len(name), c, re.compile(rf"(?<!\w){re.escape(name.lower())}(?!\w)")) for c, name in enumerate(classnames)]
    labels = []
    for caption in captions:
        text = caption.lower()
        hits = sorted(((n, c) for n, c, p in patterns if p.search(text)), reverse=True)
        if not hits or (len(hits) > 1 and hits[0][0] == hits[1][0]):
            labels.append(-1)
        else:
            labels.append(hits[0][1])
    return labels


def clip_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric CLIP loss over a batch of (image, caption) pairs; same-class pairs are positives.

    ``image``/``text`` (B, D) normalised; ``labels`` (B,) (-1: only the own caption is positive).
    """
    logits = image @ text.T / tau
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    pos = same | torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    i2t = -(F.log_softmax(logits, dim=1) * pos).sum(1) / pos.sum(1)
    t2i = -(F.log_softmax(logits, dim=0) * pos).sum(0) / pos.sum(0)
    return 0.5 * (i2t.mean() + t2i.mean())


def region_to_label_loss(regions: torch.Tensor, usable: torch.Tensor, labels: torch.Tensor,
                         label_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """``L_R``: each usable (non-spurious) region is classified over the batch's labels towards its image's label.

    ``regions`` (B, R, D) normalised, ``usable`` (B, R) bool, ``labels`` (B,), ``label_emb`` (C, D).
    """
    present = torch.unique(labels[labels >= 0])
    mask = usable & (labels[:, None] >= 0)
    if len(present) == 0 or not mask.any():
        return regions.sum() * 0.0
    logits = regions[mask] @ label_emb[present].T / tau  # (n, |present|)
    target = torch.searchsorted(present, labels[:, None].expand_as(mask)[mask])
    return F.cross_entropy(logits, target)


def relevant_regions(regions: torch.Tensor, usable: torch.Tensor, labels: torch.Tensor,
                     label_emb: torch.Tensor) -> torch.Tensor:
    """(B, R) mask: per image, the usable region scoring highest for the image's label (none without one)."""
    with torch.no_grad():
        scores = (regions * label_emb[labels.clamp_min(0)][:, None]).sum(-1)
        scores = scores.masked_fill(~usable, float("-inf"))
        best = scores.argmax(1)
    out = torch.zeros_like(usable)
    out[torch.arange(len(best), device=usable.device), best] = True
    return out & usable & (labels[:, None] >= 0)


def label_to_region_loss(regions: torch.Tensor, valid: torch.Tensor, spurious: torch.Tensor, labels: torch.Tensor,
                         label_emb: torch.Tensor, tau: float, positives: torch.Tensor | None = None,
                         other_class_negatives: bool = False) -> torch.Tensor:
    """``L_A``: per label in the batch, InfoNCE with its images' positive regions (default: every non-spurious
    one) against every spurious region of the batch (and, with ``other_class_negatives``, the positive regions
    of the other labels' images), so spurious regions move away from all labels."""
    if positives is None:
        positives = valid & ~spurious
    spurious_neg = (valid & spurious).flatten()
    if not spurious_neg.any() and not other_class_negatives:
        return regions.sum() * 0.0
    flat = regions.flatten(0, 1)
    losses = []
    for c in torch.unique(labels[labels >= 0]):
        mine = labels[:, None] == c
        pos = (positives & mine).flatten()
        neg = spurious_neg | (positives & ~mine & (labels[:, None] >= 0)).flatten() if other_class_negatives else spurious_neg
        if not pos.any() or not neg.any():
            continue
        sims = flat @ label_emb[c] / tau  # (B*R,)
        losses.append(torch.logsumexp(sims[pos | neg], 0) - torch.logsumexp(sims[pos], 0))
    return torch.stack(losses).mean() if losses else regions.sum() * 0.0
