"""``group_dro_head``: GroupDRO (Sagawa et al., ICLR 2020) as a linear head on cached features.

Online exponentiated group weights over the train split's groups (SubpopBench's recipe,
eta 1e-2), full-batch steps; the L2 strength and the stopping step are chosen on the val
split's worst-group accuracy, as in the paper.  Protocol and deviations:
``docs/methods/group_dro_head.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...argtypes import at_least, fraction, option, positive_float
from ...hookspecs import hookimpl
from ...specs import Needs
from ..linear_head import class_rows
from .common import RobustHead

NAME = "group_dro_head"


@dataclass(frozen=True)
class GroupDROConfig:
    """The ``--group_dro_head_*`` flags."""

    eta: float = option(1e-2, "step size of the exponentiated group weights (SubpopBench's default)", type=positive_float)
    l2: tuple[float, ...] = option((1e-4, 1e-2, 1e-1, 1.0), "L2 penalties to choose from on val (all trained at once)",
                                   type=float, metavar="L2")
    steps: int = option(200, "full-batch steps", type=at_least(1))
    every: int = option(10, "score the heads on val every this many steps (early stopping)", type=at_least(1))
    lr_scale: float = option(1.0, "learning rate as a multiple of 1/L (L: a bound on the loss's curvature)",
                             type=positive_float)
    momentum: float = option(0.9, "Nesterov momentum of the full-batch SGD steps", type=fraction)


class GroupDROHead(RobustHead):
    """Softmax head minimising the q-weighted group losses, q updated every step."""

    name = NAME
    needs = Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"}))
    Config = GroupDROConfig
    option_prefix = "group_dro_head_"
    description = ("GroupDRO linear head: exponentiated group weights on train group losses (train group labels; "
                   "L2 and stopping step chosen on val worst-group accuracy, val group labels)")
    citation = ("Sagawa, Koh, Hashimoto & Liang, Distributionally Robust Neural Networks for Group Shifts, "
                "ICLR 2020")
    state_scalars = ("l2_chosen", "step_chosen")

    def check(self, ctx) -> None:
        if any(v < 0 for v in self.config.l2):
            raise ValueError(f"{NAME}: L2 penalties must be >= 0, got {list(self.config.l2)}")

    def fit_head(self, x, y, groups, ctx):
        from .solver import group_dro, worst_group_acc

        self.check(ctx)
        c = self.config
        names = ctx.schema.group_names(self.grouping)
        classes = np.unique(y)
        xv, yv, gv = self.split_data(ctx, self.selection_split, groups=True)
        zv = self.transform(xv)
        table, best = [], {}

        def checkpoint(step, W, b, q):
            for k, l2 in enumerate(c.l2):
                coef, intercept = class_rows(W[k], b[k], classes, ctx.n_classes, self.name)
                score = worst_group_acc(zv @ coef.T + intercept, yv, gv)
                table.append({"l2": l2, "step": step, "worst_group_acc": score})
                if not best or score > best["score"]:
                    best.update(score=score, W=W[k].copy(), b=b[k].copy(), q=q[k].tolist(), l2=l2, step=step)

        _, _, info = group_dro(self.transform(x), y, groups, ctx.n_classes, len(names), eta=c.eta, l2=c.l2,
                               steps=c.steps, lr_scale=c.lr_scale, momentum=c.momentum, every=c.every,
                               checkpoint=checkpoint)
        self.l2_chosen, self.step_chosen = best["l2"], best["step"]
        self.choose({"l2": best["l2"], "step": best["step"]}, self.selection_split, table)
        self.info = {
            "optimizer": "SGD with Nesterov momentum, full batch",
            "curvature_bound": round(info["curvature_bound"], 6),
            "lr": info["lr"],
            "group_weights": dict(zip(names, [round(v, 6) for v in best["q"]], strict=True)),
        }
        return best["W"], best["b"]


@hookimpl
def register_mitigations(register):
    register(GroupDROHead.spec())
