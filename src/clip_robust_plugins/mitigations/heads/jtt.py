"""``jtt_head``: Just Train Twice (Liu et al., ICML 2021) as a linear head on cached features.

Stage 1, an under-fitted (strongly L2-penalised) ERM head on train, marks the train samples
it gets wrong (the error set); stage 2 refits the head with the error set's loss upweighted
by ``lambda_up``.  The stage-1 penalty and ``lambda_up`` are chosen on the val split's
worst-group accuracy (val group labels: train is read with class labels only).
Protocol and deviations: ``docs/methods/jtt_head.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...argtypes import at_least, option, positive_float
from ...hookspecs import hookimpl
from ...specs import Needs
from .common import RobustHead

NAME = "jtt_head"


def jtt_weights(wrong: np.ndarray, lambda_up: float) -> np.ndarray:
    """Per-sample loss weights: ``lambda_up`` on the error set, 1 elsewhere."""
    return np.where(wrong, float(lambda_up), 1.0)


@dataclass(frozen=True)
class JTTConfig:
    """The ``--jtt_head_*`` flags."""

    lambda_up: tuple[float, ...] = option((5.0, 10.0, 20.0, 50.0, 100.0),
                                          "error-set upweights to choose from on val worst-group accuracy",
                                          type=positive_float, metavar="LAMBDA")
    stage1_l2: tuple[float, ...] = option((0.1, 1.0), "stage-1 L2 penalties (the under-fitting) to choose from on val",
                                          type=positive_float, metavar="L2")
    l2: float = option(1e-4, "stage-2 L2 penalty", type=float)
    max_iter: int = option(500, "L-BFGS iteration cap per stage (each stage's candidates are fitted in one run)",
                           type=at_least(1))


class JTTHead(RobustHead):
    """Two-stage head: error set of an under-fitted ERM head, then an upweighted refit."""

    name = NAME
    needs = Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"}))
    fit_split_groups = False  # train: class labels only; val's group labels choose the hyperparameters
    Config = JTTConfig
    option_prefix = "jtt_head_"
    description = ("JTT linear head: upweight a stage-1 ERM head's train errors (train class labels; "
                   "lambda_up and the stage-1 penalty chosen on val worst-group accuracy, val group labels)")
    citation = ("Liu, Haghgoo, Chen, Raghunathan, Koh, Sagawa, Liang & Finn, Just Train Twice: Improving Group "
                "Robustness without Training Group Information, ICML 2021")
    state_scalars = ("lambda_up_chosen", "stage1_l2_chosen")

    def fit_head(self, x, y, groups, ctx):  # groups is None: train is read with class labels only
        from .solver import fit_softmax

        c, n_classes = self.config, ctx.n_classes
        z = self.transform(x)
        classes = np.unique(y)
        # stage 1, every penalty at once; then stage 2, every (penalty, lambda_up) at once
        W1, b1, _ = fit_softmax(z, y, n_classes, weights=np.ones((len(c.stage1_l2), len(y))), l2=c.stage1_l2,
                                max_iter=c.max_iter)
        wrong = {l2_1: np.argmax(z @ W1[k].T + b1[k], axis=1) != y for k, l2_1 in enumerate(c.stage1_l2)}
        error_sets = {l2_1: {"size": int(w.sum()), "per_class": np.bincount(y[w], minlength=n_classes).tolist()}
                      for l2_1, w in wrong.items()}
        grid = [{"stage1_l2": l2_1, "lambda_up": lam} for l2_1 in c.stage1_l2 for lam in c.lambda_up]
        weights = np.stack([jtt_weights(wrong[p["stage1_l2"]], p["lambda_up"]) for p in grid])
        W, b, _ = fit_softmax(z, y, n_classes, weights=weights, l2=[c.l2] * len(grid), max_iter=c.max_iter)
        candidates = [(params, W[k], b[k]) for k, params in enumerate(grid)]
        best, table = self.score_candidates(ctx, candidates, classes)
        params, W, b = candidates[best]
        self.lambda_up_chosen, self.stage1_l2_chosen = params["lambda_up"], params["stage1_l2"]
        self.choose(params, self.selection_split, table)
        self.info = {"error_set": error_sets[params["stage1_l2"]],
                     "error_sets": {str(k): v for k, v in error_sets.items()},
                     "solver": "L-BFGS, full batch"}
        return W, b


@hookimpl
def register_mitigations(register):
    register(JTTHead.spec())
