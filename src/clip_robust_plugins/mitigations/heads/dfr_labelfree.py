"""``dfr_labelfree``: DFR^Val_Tr with groups inferred from a stage-1 ERM head's errors (no group labels).

A deviation from DFR, which balances val by its group labels: here the "groups" of val are
(class, whether an ERM head fitted on train classifies the sample correctly), in the spirit
of JTT's error sets.  Everything else is DFR^Val_Tr (``docs/methods/dfr.md``); the
variant's page is ``docs/methods/dfr_labelfree.md``.  Registered by the ``dfr`` plugin
module (:mod:`clip_robust_plugins.mitigations.dfr`), whose ``--dfr_*`` flags it shares.
"""

from __future__ import annotations

import numpy as np

from ...records import Needs
from ..dfr import CITATION, DFR
from ..erm_head import ERMHead
from ..linear_head import class_rows

NAME = "dfr_labelfree"


def inferred_groups(y: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Group id ``2 * y + wrong``: per class, the samples stage 1 gets right (0) and wrong (1)."""
    return 2 * np.asarray(y, dtype=np.int64) + np.asarray(wrong, dtype=np.int64)


class DFRLabelFree(DFR):
    """DFR^Val_Tr on val, balanced over (class x stage-1 right/wrong) instead of the true groups."""

    name = NAME
    paper_name = "DFR^Val_Tr, groups inferred from stage-1 ERM errors"
    needs = Needs(fit_splits=("val", "train"), labels=frozenset({"class"}))
    description = ("DFR^Val_Tr without group labels: val balanced over (class x errors of an ERM head fitted on "
                   "train), class labels only")
    citation = CITATION

    @property
    def selection_split(self) -> str:
        return self.fit_split  # C is chosen on a held-out half of val, as DFR^Val_Tr

    def selection_data(self, ctx):  # pragma: no cover - DFR^Val_Tr selects on val halves, never calls this
        raise AssertionError("dfr_labelfree selects on halves of val")

    def group_names(self, ctx) -> list[str]:
        return [f"y:{c}_stage1:{verdict}" for c in ctx.classnames for verdict in ("right", "wrong")]

    def fit_head(self, x, y, groups, ctx):  # groups is None: no group labels are read
        x_train, y_train, _ = self.split_data(ctx, self.needs.fit_splits[1])
        stage1 = ERMHead()  # exactly erm_head with its defaults: its val errors define the groups
        coef1, intercept1 = class_rows(*stage1.fit_head(x_train, y_train, None, ctx), np.unique(y_train), ctx.n_classes)
        wrong = np.argmax(x @ coef1.T + intercept1, axis=1) != y
        g = inferred_groups(y, wrong)
        names = self.group_names(ctx)
        coef, intercept = self.retrain(x, y, g, names, ctx)
        counts = np.bincount(g, minlength=len(names))
        self.info["inferred_groups"] = dict(zip(names, counts.tolist(), strict=True))
        self.info["stage1"] = {"method": stage1.name, "fit_split": self.needs.fit_splits[1],
                               **stage1.hyperparameters(), "val_errors": int(wrong.sum())}
        return coef, intercept

