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
from .base import Mitigation, RunContext

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "erm_head"
#: the logit of a class absent from training: finite (non-finite logits are an error), never the argmax
NEVER = -1e9


class ERMHead(Mitigation):
    """Multinomial logistic regression (lbfgs, L2) on L2-normalised image embeddings."""

    def __init__(self, C: float = 1.0, split: str = "train", max_iter: int = 1000):
        # ``split`` must stay among the spec's Needs.fit_splits; the CLI does not change it.
        self.C = C
        self.split = split
        self.max_iter = max_iter
        self.coef: torch.Tensor | None = None  # (C, D)
        self.intercept: torch.Tensor | None = None  # (C,)

    def fit(self, ctx: RunContext) -> None:
        import numpy as np
        import torch
        from sklearn.linear_model import LogisticRegression

        fs = ctx.features(self.split)
        x, y = fs.features.numpy(), fs.y.numpy()
        seed = int(ctx.rng(NAME).integers(2**31 - 1))
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=seed)
        clf.fit(x, y)
        coef = np.zeros((ctx.n_classes, x.shape[1]))
        intercept = np.zeros(ctx.n_classes)
        if clf.coef_.shape[0] == 1:  # sklearn's binary form: one row for classes_[1]
            coef[clf.classes_[1]], intercept[clf.classes_[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
            coef[clf.classes_[0]], intercept[clf.classes_[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
        else:
            coef[clf.classes_] = clf.coef_
            intercept[clf.classes_] = clf.intercept_
            absent = np.setdiff1d(np.arange(ctx.n_classes), clf.classes_)
            intercept[absent] = NEVER  # a class never seen in training is never predicted
        self.coef = torch.from_numpy(coef).float()
        self.intercept = torch.from_numpy(intercept).float()

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        if self.coef is None:
            raise RuntimeError("erm_head: predict() before fit()")
        return ctx.features(split).features @ self.coef.T + self.intercept

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"coef": self.coef, "intercept": self.intercept}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.coef, self.intercept = state["coef"].float(), state["intercept"].float()

    def hyperparameters(self) -> dict:
        return {"C": self.C, "split": self.split, "max_iter": self.max_iter, "solver": "lbfgs"}


@dataclass(frozen=True)
class ERMHeadConfig:
    """The ``--erm_head_*`` flags."""

    C: float = option(1.0, "inverse L2 regularisation strength")


def _create(config: ERMHeadConfig) -> ERMHead:
    return ERMHead(C=config.C)


@hookimpl
def register_mitigations(register):
    register(
        MitigationSpec(
            name=NAME,
            create=_create,
            options=ERMHeadConfig,
            option_prefix="erm_head_",
            needs=Needs(fit_splits=("train",), labels=frozenset({"class"})),
            description="logistic-regression head on frozen train-split image embeddings (ERM, class labels only)",
        )
    )
