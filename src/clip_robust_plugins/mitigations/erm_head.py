"""ERM linear head: logistic regression on frozen image embeddings of the training split.

The simplest mitigation, and the reference point of the last-layer-retraining
literature: a linear probe fitted with plain empirical risk minimisation (class labels
only, no group labels).  On a spuriously correlated training split it usually inherits
the correlation; DFR (group-balanced retraining) is what fixes that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..argtypes import option
from ..hookspecs import hookimpl
from ..records import MitigationSpec, Needs
from .linear_head import LinearHead

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .base import RunContext

NAME = "erm_head"


@dataclass(frozen=True)
class ERMHeadConfig:
    C: float = option(1.0, "inverse L2 regularisation strength")
    max_iter: int = option(1000, "lbfgs iterations at most")


class ERMHead(LinearHead):
    """Multinomial logistic regression (lbfgs, L2) on L2-normalised image embeddings."""

    name = NAME
    needs = Needs(fit_splits=("train",), labels=frozenset({"class"}))

    def __init__(self, config: ERMHeadConfig | None = None):
        super().__init__(config or ERMHeadConfig())
        self.fit_info = {"solver": "lbfgs"}

    def fit_head(self, x: np.ndarray, y: np.ndarray, groups: None, ctx: RunContext):
        from sklearn.linear_model import LogisticRegression

        seed = int(ctx.rng(NAME).integers(2**31 - 1))
        clf = LogisticRegression(C=self.config.C, max_iter=self.config.max_iter, random_state=seed)
        clf.fit(x, y)
        return clf.coef_, clf.intercept_


@hookimpl
def register_mitigations(register):
    register(
        MitigationSpec(
            name=NAME,
            create=ERMHead,
            needs=ERMHead.needs,
            description="logistic-regression head on frozen train-split image embeddings (ERM, class labels only)",
            options=ERMHeadConfig,
            option_prefix="erm_head_",
        )
    )
