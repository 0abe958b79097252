"""``afr``: Automatic Feature Reweighting (Qiu et al., ICML 2023) on cached features.

Stage 1: an ERM head on a random 80% of train.  Stage 2, on the other 20%: per-sample
weights ``exp(-gamma * p_true)`` from the stage-1 head (class-rebalanced, normalised), and
a head initialised at and pulled towards the stage-1 head, minimising the weighted
cross-entropy plus ``reg * (|W - W1|^2 + |b - b1|^2)``.  ``gamma`` and ``reg`` are chosen
on the val split's worst-group accuracy (val group labels; train is read with class
labels only).  Protocol and deviations: ``docs/methods/afr.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...argtypes import at_least, fraction, option, positive_float
from ...hookspecs import hookimpl
from ...specs import Needs
from .common import RobustHead

NAME = "afr"


def afr_weights(logits: np.ndarray, y: np.ndarray, gamma: float, rebalance: bool) -> np.ndarray:
    """``exp(-gamma p_true)`` from stage-1 logits; ``rebalance`` multiplies class ``c``'s weights
    by ``N / N_c`` (the authors' default); normalised to sum to 1."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    w = np.exp(-gamma * p[np.arange(len(y)), y])
    if rebalance:
        counts = np.bincount(y)
        w = w * (len(y) / counts[y])
    return w / w.sum()


def stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(first, second)`` sorted index arrays: ``round(fraction * n_c)`` of each class's
    shuffled members go to ``first`` (at least one row of each class stays in ``second``)."""
    first, second = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        k = min(len(members) - 1, int(round(fraction * len(members))))
        first.append(members[:k])
        second.append(members[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


@dataclass(frozen=True)
class AFRConfig:
    """The ``--afr_*`` flags."""

    gamma: tuple[float, ...] = option((0.0, 1.0, 2.0, 4.0, 8.0, 16.0),
                                      "weight sharpness values to choose from on val (0: class-balanced refit)",
                                      type=float, metavar="GAMMA")
    reg: tuple[float, ...] = option((1e-4, 1e-3, 1e-2, 1e-1), "pull towards the stage-1 head, values to choose from on val",
                                    type=positive_float, metavar="REG")
    stage1_fraction: float = option(0.8, "fraction of train for stage 1 (the rest reweights)", type=fraction)
    stage1_l2: float = option(1e-4, "stage-1 L2 penalty", type=float)
    rebalance: bool = option(True, "class-rebalance the stage-2 weights (the authors' default)")
    max_iter: int = option(500, "L-BFGS iteration cap (all candidates are fitted in one run)", type=at_least(1))


class AFRHead(RobustHead):
    """AFR's second stage as a convex reweighted refit, hyperparameters by val worst-group accuracy."""

    name = NAME
    needs = Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"}))
    fit_split_groups = False  # train: class labels only; val's group labels choose the hyperparameters
    Config = AFRConfig
    option_prefix = "afr_"
    description = ("AFR: stage-1 ERM head on 80% of train, exp(-gamma p_true)-weighted refit on the rest "
                   "(train class labels; gamma and reg chosen on val worst-group accuracy, val group labels)")
    citation = ("Qiu, Potapczynski, Izmailov & Wilson, Simple and Fast Group Robustness by Automatic Feature "
                "Reweighting, ICML 2023")
    state_scalars = ("gamma_chosen", "reg_chosen")

    def check(self, ctx) -> None:
        if not 0.0 < self.config.stage1_fraction < 1.0:
            raise ValueError(f"{NAME}: stage1_fraction must be in (0, 1), got {self.config.stage1_fraction}")
        if any(g < 0 for g in self.config.gamma):
            raise ValueError(f"{NAME}: gamma values must be >= 0, got {list(self.config.gamma)}")

    def fit_head(self, x, y, groups, ctx):  # groups is None: train is read with class labels only
        from .solver import fit_softmax

        self.check(ctx)
        c, n_classes = self.config, ctx.n_classes
        z = self.transform(x)
        first, second = stratified_split(y, c.stage1_fraction, ctx.rng(f"{NAME}/split"))
        W1, b1, _ = fit_softmax(z[first], y[first], n_classes, l2=c.stage1_l2, max_iter=c.max_iter)
        z2, y2 = z[second], y[second]
        logits1 = z2 @ W1.T + b1
        grid = [{"gamma": gamma, "reg": reg} for gamma in c.gamma for reg in c.reg]
        weights = np.stack([afr_weights(logits1, y2, p["gamma"], c.rebalance) for p in grid])
        W, b, _ = fit_softmax(z2, y2, n_classes, weights=weights, l2=[2.0 * p["reg"] for p in grid],
                              anchor=(W1, b1), max_iter=c.max_iter)
        candidates = [(params, W[k], b[k]) for k, params in enumerate(grid)]
        best, table = self.score_candidates(ctx, candidates, np.unique(y))
        params, W, b = candidates[best]
        self.gamma_chosen, self.reg_chosen = params["gamma"], params["reg"]
        self.choose(params, self.selection_split, table)
        self.info = {"stage1_size": int(first.size), "stage2_size": int(second.size),
                     "split_salt": f"{NAME}/split", "seed": int(ctx.seed), "solver": "L-BFGS, full batch"}
        return W, b


@hookimpl
def register_mitigations(register):
    register(AFRHead.spec())
