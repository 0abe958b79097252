"""``class_balanced_head``: a linear head with the class-balanced loss (Cui et al., CVPR 2019).

Class labels only: each sample's cross-entropy is weighted by ``(1 - beta) / (1 - beta^n_c)``
for its class ``c`` with ``n_c`` train samples (beta -> 1: inverse class frequency).
Protocol and deviations: ``docs/methods/class_balanced_head.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...argtypes import at_least, fraction, option
from ...hookspecs import hookimpl
from ...specs import Needs
from .common import RobustHead

NAME = "class_balanced_head"


def class_balanced_weights(y: np.ndarray, n_classes: int, beta: float) -> np.ndarray:
    """Per-class weights ``(1 - beta) / (1 - beta^n_c)``, normalised to sum to the number of
    present classes (absent classes: 0).  ``beta = 1`` is inverse class frequency."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = 1.0 / counts[present] if beta >= 1.0 else (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    return w / w.sum() * present.sum()


@dataclass(frozen=True)
class ClassBalancedConfig:
    """The ``--class_balanced_head_*`` flags."""

    beta: float = option(0.9999, "effective-number beta in [0, 1] (1: inverse class frequency; 0: plain ERM)",
                         type=fraction)
    l2: float = option(1e-4, "L2 penalty on the head's weights", type=float)
    max_iter: int = option(200, "L-BFGS iteration cap", type=at_least(1))


class ClassBalancedHead(RobustHead):
    """Softmax head on standardised train features, class-balanced cross-entropy."""

    name = NAME
    needs = Needs(fit_splits=("train",), labels=frozenset({"class"}))
    Config = ClassBalancedConfig
    option_prefix = "class_balanced_head_"
    description = "linear head with the class-balanced loss (effective number of samples; class labels only)"
    citation = "Cui, Jia, Lin, Song & Belongie, Class-Balanced Loss Based on Effective Number of Samples, CVPR 2019"

    def fit_head(self, x, y, groups, ctx):
        from .solver import fit_softmax

        c = self.config
        per_class = class_balanced_weights(y, ctx.n_classes, c.beta)
        W, b, info = fit_softmax(self.transform(x), y, ctx.n_classes, weights=per_class[y], l2=c.l2, max_iter=c.max_iter)
        self.info = {"class_weights": dict(zip(ctx.classnames, [round(float(v), 6) for v in per_class], strict=True)),
                     "solver": "L-BFGS, full batch", "iterations": info["iterations"]}
        return W, b


@hookimpl
def register_mitigations(register):
    register(ClassBalancedHead.spec())
