"""``group_dro_head``: GroupDRO (Sagawa et al., ICLR 2020) as a linear head on cached features.

Online exponentiated group weights over the train split's groups (SubpopBench's recipe,
eta 1e-2), full-batch steps; protocol and deviations: ``docs/methods/group_dro_head.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...argtypes import at_least, fraction, option, positive_float
from ...hookspecs import hookimpl
from ...records import Needs
from .common import RobustHead

NAME = "group_dro_head"


@dataclass(frozen=True)
class GroupDROConfig:
    """The ``--group_dro_head_*`` flags."""

    eta: float = option(1e-2, "step size of the exponentiated group weights (SubpopBench's default)", type=positive_float)
    steps: int = option(500, "full-batch steps", type=at_least(1))
    lr_scale: float = option(1.0, "learning rate as a multiple of 1/L (L: a bound on the loss's curvature)",
                             type=positive_float)
    momentum: float = option(0.9, "Nesterov momentum of the full-batch SGD steps", type=fraction)
    l2: float = option(1e-4, "L2 penalty (weight decay) on the head's weights", type=float)


class GroupDROHead(RobustHead):
    """Softmax head minimising the q-weighted group losses, q updated every step."""

    name = NAME
    needs = Needs(fit_splits=("train",), labels=frozenset({"class", "group"}))
    Config = GroupDROConfig
    option_prefix = "group_dro_head_"
    description = "GroupDRO linear head: exponentiated group weights on train-split group losses (train group labels)"
    citation = ("Sagawa, Koh, Hashimoto & Liang, Distributionally Robust Neural Networks for Group Shifts, "
                "ICLR 2020")

    def fit_head(self, x, y, groups, ctx):
        from .solver import group_dro

        c = self.config
        names = ctx.schema.group_names(self.grouping)
        W, b, info = group_dro(self.transform(x), y, groups, ctx.n_classes, len(names),
                               eta=c.eta, l2=c.l2, steps=c.steps, lr_scale=c.lr_scale,
                               momentum=c.momentum)
        self.info = {
            "optimizer": "SGD with Nesterov momentum, full batch",
            "curvature_bound": round(info["curvature_bound"], 6),
            "lr": info["lr"],
            "group_weights": dict(zip(names, [round(v, 6) for v in info["group_weights"]], strict=True)),
            "final_group_losses": dict(zip(names, info["final_group_losses"], strict=True)),
        }
        return W, b


@hookimpl
def register_mitigations(register):
    register(GroupDROHead.spec())
