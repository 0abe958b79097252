"""ERM linear head: logistic regression on frozen image embeddings of the training split.

The simplest mitigation, and the reference point of the last-layer-retraining
literature: a linear probe fitted with plain empirical risk minimisation (class labels
only, no group labels).  On a spuriously correlated training split it usually inherits
the correlation; DFR (group-balanced retraining) is what fixes that.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..argtypes import at_least, option, positive_float
from ..hookspecs import hookimpl
from ..specs import Needs
from .linear_head import NEVER, LinearHead  # noqa: F401 - NEVER re-exported for older imports

NAME = "erm_head"


@dataclass(frozen=True)
class ERMHeadConfig:
    """The ``--erm_head_*`` flags."""

    C: float = option(1.0, "inverse L2 regularisation strength", type=positive_float)
    max_iter: int = option(1000, "lbfgs iteration cap", type=at_least(1))


class ERMHead(LinearHead):
    """Multinomial logistic regression (lbfgs, L2) on L2-normalised image embeddings."""

    name = NAME
    needs = Needs(fit_splits=("train",), labels=frozenset({"class"}))
    Config = ERMHeadConfig
    option_prefix = "erm_head_"
    description = "logistic-regression head on frozen train-split image embeddings (ERM, class labels only)"

    def fit_head(self, x, y, groups, ctx):
        from sklearn.linear_model import LogisticRegression

        seed = int(ctx.rng(NAME).integers(2**31 - 1))
        clf = LogisticRegression(C=self.config.C, max_iter=self.config.max_iter, random_state=seed)
        clf.fit(x.astype("float32"), y)  # float32 as the features are stored (and as fitted before the base existed)
        return clf.coef_, clf.intercept_

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "solver": "lbfgs"}


@hookimpl
def register_mitigations(register):
    register(ERMHead.spec())
