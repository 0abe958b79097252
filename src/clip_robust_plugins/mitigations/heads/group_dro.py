"""``group_dro_head``: a linear head trained with full-batch GroupDRO on train features.

Sagawa et al. 2020, with SubpopBench's update (see docs/methods/group_dro_head.md): per step,
the mean cross-entropy of every group, exponentiated group weights ``q``, and a gradient step
on the q-weighted loss.  Group labels of the train split are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...argtypes import option
from ...hookspecs import hookimpl
from ...records import MitigationSpec, Needs
from ..linear_head import LinearHead

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from ..base import RunContext

NAME = "group_dro_head"


@dataclass(frozen=True)
class GroupDROConfig:
    eta: float = option(1e-2, "step size of the exponentiated group-weight update")
    lr: float = option(0.1, "learning rate of full-batch SGD (momentum 0.9)")
    steps: int = option(1000, "full-batch gradient steps")
    weight_decay: float = option(1e-4, "L2 weight decay on the head's weights (not the bias)")


def group_dro(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, n_groups: int,
              cfg: GroupDROConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coef, intercept, q)`` after ``cfg.steps`` full-batch steps from a zero head (float64).

    No random draw: the batch is the whole split and the start is zero, so the result is a
    function of the data and the config alone.  Groups absent from the split keep weight 0.
    """
    import torch
    import torch.nn.functional as F

    X = torch.as_tensor(x, dtype=torch.float64)
    Y = torch.as_tensor(y, dtype=torch.int64)
    member = F.one_hot(torch.as_tensor(groups, dtype=torch.int64), n_groups).double()  # (N, G)
    counts = member.sum(0)
    q = (counts > 0).double()
    q = q / q.sum()
    W = torch.zeros((n_classes, X.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([{"params": [W], "weight_decay": cfg.weight_decay}, {"params": [b], "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=0.9)
    for _ in range(cfg.steps):
        per_sample = F.cross_entropy(X @ W.T + b, Y, reduction="none")
        losses = member.T @ per_sample / counts.clamp(min=1)  # (G,) mean CE per group
        q = q * torch.exp(cfg.eta * losses.detach())
        q = q / q.sum()
        opt.zero_grad()
        (q @ losses).backward()
        opt.step()
    return W.detach(), b.detach(), q


class GroupDROHead(LinearHead):
    """Linear head whose training loss is the GroupDRO-weighted sum of per-group losses."""

    name = NAME
    needs = Needs(fit_splits=("train",), labels=frozenset({"class", "group"}))

    def __init__(self, config: GroupDROConfig | None = None):
        super().__init__(config or GroupDROConfig())

    def check(self, ctx: RunContext) -> None:
        cfg = self.config
        if cfg.steps < 1 or cfg.lr <= 0 or cfg.eta < 0 or cfg.weight_decay < 0:
            raise ValueError(f"{NAME}: needs steps >= 1, lr > 0, eta >= 0 and weight_decay >= 0, got {cfg}")

    def fit_head(self, x, y, groups, ctx: RunContext):
        coef, intercept, q = group_dro(x, y, groups, ctx.n_classes, ctx.schema.n_groups(), self.config)
        names = ctx.schema.group_names()
        self.fit_info = {"final_group_weights": {n: round(float(w), 6) for n, w in zip(names, q)},
                         "optimizer": "full-batch SGD, momentum 0.9, zero init"}
        return coef, intercept


@hookimpl
def register_mitigations(register):
    register(
        MitigationSpec(
            name=NAME,
            create=GroupDROHead,
            needs=GroupDROHead.needs,
            description="linear head trained with full-batch GroupDRO on train features (train group labels)",
            citation="Sagawa et al., Distributionally Robust Neural Networks for Group Shifts, ICLR 2020",
            options=GroupDROConfig,
            option_prefix="group_dro_",
        )
    )
