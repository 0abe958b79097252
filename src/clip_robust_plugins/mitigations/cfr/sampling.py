"""CFR's sets: the calibration set, positives, negatives (hard or the authors'), and the anchor cycle."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def calibration_split(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices CLIP+ERM gets wrong: the calibration set, indices it gets right: the positive pool)."""
    wrong = pred != y
    return wrong.nonzero().flatten(), (~wrong).nonzero().flatten()


def hard_negatives(space: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """For each anchor, the ``k`` most cosine-similar rows of ``space`` whose class differs.

    Returns (len(anchors), min(k, n_other)) indices into ``space``, most similar first.
    ``k`` shrinks to the smallest number of other-class samples any anchor has.
    """
    if len(anchors) == 0:
        return torch.zeros(0, 0, dtype=torch.long)
    unit = F.normalize(space.float(), dim=-1)
    per_class = torch.bincount(y)
    k = min(k, int((len(y) - per_class[y[anchors]]).min()))
    out = []
    for i in range(0, len(anchors), chunk):
        idx = anchors[i:i + chunk]
        sim = unit[idx] @ unit.T
        sim[y.unsqueeze(0) == y[idx].unsqueeze(1)] = -float("inf")  # same class (self included) is never a negative
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out).cpu()


def sample_positives(
    anchor_y: torch.Tensor, pool: torch.Tensor, y: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` samples of ``pool`` of each anchor's class, drawn afresh.

    Without replacement where the class has at least ``k`` of them, with replacement
    otherwise.  Returns (indices (B, k), valid (B,)): an anchor whose class has no
    member in ``pool`` gets none (``valid`` False).  With ``pool`` = the correctly
    classified train samples these are CFR's positives; with ``pool`` = all train
    samples, the authors' negatives (:func:`authors_negatives`).
    """
    out = torch.zeros(len(anchor_y), k, dtype=torch.long)
    valid = torch.zeros(len(anchor_y), dtype=torch.bool)
    pool_y = y[pool]
    for c in torch.unique(anchor_y).tolist():
        rows = (anchor_y == c).nonzero().flatten()
        members = pool[pool_y == c]
        if len(members) == 0:
            continue
        if len(members) >= k:
            pick = torch.rand(len(rows), len(members), generator=generator).topk(k, dim=1, largest=False).indices
        else:
            pick = torch.randint(len(members), (len(rows), k), generator=generator)
        out[rows] = members[pick]
        valid[rows] = True
    return out, valid


def authors_negatives(anchor_y: torch.Tensor, y: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """What the authors' loader returns as negatives: ``k`` random train samples of the anchor's *own*
    class (any prediction), drawn afresh for every anchor (their hard negatives are computed, then
    overwritten).  Returns (B, k) indices into the train split."""
    out, _ = sample_positives(anchor_y, torch.arange(len(y)), y, k, generator)
    return out


class AnchorCycle:
    """Calibration anchors walked cyclically, reshuffled each time the cycle wraps around
    (the authors index the calibration set by ``idx % len``)."""

    def __init__(self, cal: torch.Tensor, generator: torch.Generator):
        self.cal, self.gen = cal, generator
        self.order = cal[torch.randperm(len(cal), generator=generator)] if len(cal) else cal
        self.cursor = 0

    def take(self, n: int) -> torch.Tensor:
        picks = []
        while n:
            if self.cursor == len(self.order):
                self.order, self.cursor = self.cal[torch.randperm(len(self.cal), generator=self.gen)], 0
            step = min(n, len(self.order) - self.cursor)
            picks.append(self.order[self.cursor:self.cursor + step])
            self.cursor += step
            n -= step
        return torch.cat(picks)
