"""Deep Feature Reweighting (DFR, Kirichenko et al., ICLR 2023): retrain the last layer, an L1
logistic regression on cached CLIP image embeddings, on group-balanced data.

``dfr`` is DFR^Val_Tr (retrains on val), ``dfr_train`` DFR^Tr_Tr (retrains on train, selects C
on val).  Protocol, the authors' code it follows and our deviations: ``docs/methods/dfr.md``.
scikit-learn and torch are imported when a run fits or predicts, not at registration.
"""

from __future__ import annotations

import functools
import hashlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..accuracy import worst_group_accuracy
from ..argtypes import at_least, option, positive_float
from ..hookspecs import hookimpl
from ..specs import Needs
from .base import RunContext
from .erm_head import ERMHead
from .linear_head import LinearHead, class_rows

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sklearn.linear_model import LogisticRegression

NAME_VAL = "dfr"
NAME_TRAIN = "dfr_train"
#: the authors' Waterbirds grid (``C_OPTIONS`` in dfr_evaluate_spurious.py)
DEFAULT_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
#: the authors' ``num_retrains`` defaults per variant
DEFAULT_N_FITS = {NAME_VAL: 20, NAME_TRAIN: 10}
#: scikit-learn's (and the authors') default for liblinear
DEFAULT_MAX_ITER = 100

CITATION = (
    "Kirichenko, Izmailov & Wilson, Last Layer Re-Training is Sufficient for Robustness to "
    "Spurious Correlations, ICLR 2023"
)


@dataclass(frozen=True)
class DFRConfig:
    """The ``--dfr_*`` flags (shared by ``dfr`` and ``dfr_train``)."""

    c_grid: tuple[float, ...] = option(
        DEFAULT_C_GRID, "inverse L1 strengths to select from by worst-group accuracy (the authors' grid)",
        type=positive_float, metavar="C")
    n_fits: int | None = option(
        None, f"group-balanced refits averaged into the final head (none: {DEFAULT_N_FITS[NAME_VAL]} for dfr, "
        f"{DEFAULT_N_FITS[NAME_TRAIN]} for dfr_train, as the authors)", type=at_least(1))
    max_iter: int = option(DEFAULT_MAX_ITER, "liblinear iteration cap per fit", type=at_least(1))


def _sklearn_version() -> tuple[int, int]:
    import sklearn

    major, minor = (int(p) for p in re.findall(r"\d+", sklearn.__version__)[:2])
    return major, minor


@functools.cache
def l1_kwargs() -> dict[str, Any]:
    """How to ask LogisticRegression for a pure L1 penalty on the installed scikit-learn."""
    return {"l1_ratio": 1.0} if _sklearn_version() >= (1, 8) else {"penalty": "l1"}


# ----------------------------------------------------------------------------- pieces
def group_balanced_subsample(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of a subsample where every non-empty group has the same size.

    Each group present in ``groups`` is subsampled without replacement to the size of
    the smallest present group; absent (empty) groups are simply skipped.
    """
    groups = np.asarray(groups)
    present = np.unique(groups)
    if present.size == 0:
        raise ValueError("cannot balance an empty set of samples")
    members = [np.flatnonzero(groups == g) for g in present]
    size = min(len(m) for m in members)
    picked = [rng.choice(m, size=size, replace=False) for m in members]
    return np.sort(np.concatenate(picked))


def split_halves(groups: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random half split, group by group: ``(tuning, selection)`` sorted index arrays.

    Of each group's ``n_g`` shuffled members, ``n_g // 2`` go to the selection half and
    the rest (at least one) to the tuning half.
    """
    groups = np.asarray(groups)
    tuning: list[np.ndarray] = []
    selection: list[np.ndarray] = []
    for g in np.unique(groups):
        perm = rng.permutation(np.flatnonzero(groups == g))
        k = len(perm) // 2
        selection.append(perm[:k])
        tuning.append(perm[k:])
    return np.sort(np.concatenate(tuning)), np.sort(np.concatenate(selection))


def _l1_logreg(C: float, max_iter: int, random_state: int) -> LogisticRegression:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="liblinear", max_iter=max_iter, random_state=random_state, **l1_kwargs())


def fit_l1_logreg(
    x: np.ndarray, y: np.ndarray, n_classes: int, C: float, *, max_iter: int = DEFAULT_MAX_ITER, random_state: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """One L1 liblinear fit in logit form: ``(coef (n_classes, D), intercept (n_classes,), n_convergence_warnings)``.

    Every class in ``range(n_classes)`` must occur in ``y``.  Two classes: sklearn's
    single binary row ``w, b`` becomes ``(-w/2, -b/2), (w/2, b/2)``.  More classes:
    one-vs-rest, one binary fit per class.
    """
    from sklearn.exceptions import ConvergenceWarning

    present = np.unique(y)
    if not np.array_equal(present, np.arange(n_classes)):
        raise ValueError(f"fit_l1_logreg needs every class 0..{n_classes - 1} in y, got {present.tolist()}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if n_classes == 2:
            clf = _l1_logreg(C, max_iter, random_state).fit(x, y)
            coef, intercept = class_rows(clf.coef_, clf.intercept_, clf.classes_, n_classes, "fit_l1_logreg")
        else:
            rows = [_l1_logreg(C, max_iter, random_state).fit(x, (y == k).astype(np.int64)) for k in range(n_classes)]
            coef = np.stack([clf.coef_[0] for clf in rows])
            intercept = np.array([clf.intercept_[0] for clf in rows])
    n_unconverged = 0
    for w in caught:  # re-emit anything that is not liblinear's convergence notice
        if issubclass(w.category, ConvergenceWarning):
            n_unconverged += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return coef, intercept, n_unconverged


def _predict(x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    return np.argmax(x @ coef.T + intercept, axis=1)


def select_c(
    x_tune: np.ndarray,
    y_tune: np.ndarray,
    x_select: np.ndarray,
    y_select: np.ndarray,
    g_select: np.ndarray,
    c_grid: Sequence[float],
    n_classes: int,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    random_state: int = 0,
) -> tuple[float, list[dict[str, float]], int]:
    """Fit each C on the (standardised) tuning data, score worst-group accuracy on the selection data.

    Only ``(x_select, y_select, g_select)`` is scored.  Returns the chosen C (first best
    in grid order), ``[{"C", "worst_group_acc"}, ...]`` in grid order, and the number of
    liblinear convergence warnings.
    """
    scores: list[dict[str, float]] = []
    n_unconverged = 0
    for c in c_grid:
        coef, intercept, bad = fit_l1_logreg(x_tune, y_tune, n_classes, c, max_iter=max_iter, random_state=random_state)
        n_unconverged += bad
        wga = worst_group_accuracy(_predict(x_select, coef, intercept), y_select, g_select)
        scores.append({"C": float(c), "worst_group_acc": wga})
    best = int(np.argmax([s["worst_group_acc"] for s in scores]))
    return float(c_grid[best]), scores, n_unconverged


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- method
class DFR(LinearHead):
    """DFR^Val_Tr: retrain on val, select C on a held-out half of val; see docs/methods/dfr.md.

    After :meth:`fit`, the subsamples are kept for inspection: ``tuning_indices`` (the
    group-balanced rows the C grid was fitted on), ``selection_indices`` (rows of the
    selection split that C was scored on) and ``final_indices`` (one array per final
    fit), all row indices into the respective split's features.
    """

    name = NAME_VAL
    paper_name = "DFR^Val_Tr"
    needs = Needs(fit_splits=("val",), labels=frozenset({"class", "group"}))
    Config = DFRConfig
    option_prefix = "dfr_"
    description = "DFR^Val_Tr: L1 logistic regression on group-balanced val embeddings, C by held-out worst-group acc"
    citation = CITATION
    standardize = True
    state_scalars = ("C",)
    needs_every_class = True
    standardize_text = ("C selection: StandardScaler fitted on the balanced tuning half; "
                        "final fits and prediction: StandardScaler fitted on all of val")

    def __init__(self, config: DFRConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        c_grid = tuple(float(c) for c in self.config.c_grid)
        if not c_grid or any(not np.isfinite(c) or c <= 0 for c in c_grid):
            raise ValueError(f"{self.name}: the C grid must be non-empty positive numbers, got {list(c_grid)}")
        n_fits = DEFAULT_N_FITS.get(self.name, DEFAULT_N_FITS[NAME_VAL]) if self.config.n_fits is None else int(self.config.n_fits)
        if n_fits < 1:
            raise ValueError(f"{self.name}: n_fits must be >= 1, got {n_fits}")
        if self.config.max_iter < 1:
            raise ValueError(f"{self.name}: max_iter must be >= 1, got {self.config.max_iter}")
        self.c_grid, self.n_fits, self.max_iter = c_grid, n_fits, int(self.config.max_iter)
        self.tuning_indices: np.ndarray | None = None
        self.selection_indices: np.ndarray | None = None
        self.final_indices: list[np.ndarray] = []

    @property
    def selection_split(self) -> str:
        return self.needs.fit_splits[-1]

    # -------------------------------------------------------------- helpers
    def _seed(self, rng: np.random.Generator) -> int:
        return int(rng.integers(2**31 - 1))

    def _empty_groups(self, g: np.ndarray, names: list[str], split: str) -> list[str]:
        counts = np.bincount(g, minlength=len(names))
        empty = [names[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            warnings.warn(
                f"{self.name}: group(s) {empty} have no samples in split {split!r}; "
                "they are skipped when balancing (the other groups are balanced to the smallest non-empty one)",
                UserWarning,
                stacklevel=4,
            )
        return empty

    def _selection(self, ctx: RunContext, x: np.ndarray, y: np.ndarray, g: np.ndarray, salt: str):
        """The balanced tuning rows, the tuning scaler and the (x, y, g) C is scored on."""
        from sklearn.preprocessing import StandardScaler

        if self.selection_split == self.fit_split:  # DFR^Val_Tr: two halves of the retraining split
            tune_half, select_idx = split_halves(g, ctx.rng(f"{salt}/halves"))
            if select_idx.size == 0:
                raise ValueError(f"{self.name}: split {self.fit_split!r} is too small to halve (every group has one sample)")
            tune_idx = tune_half[group_balanced_subsample(g[tune_half], ctx.rng(f"{salt}/tune_balance"))]
            tune_scaler = StandardScaler().fit(x[tune_idx])
            selection = (x[select_idx], y[select_idx], g[select_idx])
            self.info["selection"] = f"held-out half of {self.fit_split!r} (disjoint from the tuning half)"
        else:
            tune_idx = group_balanced_subsample(g, ctx.rng(f"{salt}/tune_balance"))
            tune_scaler = self.scaler  # fitted on all of the retraining split
            selection = self.selection_data(ctx)
            select_idx = np.arange(len(selection[1]))
            self.info["selection"] = f"whole {self.selection_split!r} split"
        self.tuning_indices, self.selection_indices = tune_idx, select_idx
        return tune_idx, tune_scaler, selection

    def selection_data(self, ctx: RunContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.split_data(ctx, self.selection_split, groups=True)

    def group_names(self, ctx: RunContext) -> list[str]:
        return ctx.schema.group_names(self.grouping)

    # ------------------------------------------------------------------ fit
    def fit_head(self, x, y, g, ctx):
        return self.retrain(x, y, g, self.group_names(ctx), ctx)

    def retrain(self, x: np.ndarray, y: np.ndarray, g: np.ndarray, names: list[str], ctx: RunContext):
        """DFR proper on (x, y, groups g): choose C, then average group-balanced refits."""
        from sklearn.exceptions import ConvergenceWarning

        n_classes, salt = ctx.n_classes, self.name
        empty = self._empty_groups(g, names, self.fit_split)
        liblinear_rng = ctx.rng(f"{salt}/liblinear")
        # ---- 1. choose C
        tune_idx, tune_scaler, (x_sel, y_sel, g_sel) = self._selection(ctx, x, y, g, salt)
        best_c, scores, unconverged = select_c(
            tune_scaler.transform(x[tune_idx]), y[tune_idx], tune_scaler.transform(x_sel), y_sel, g_sel,
            self.c_grid, n_classes, max_iter=self.max_iter, random_state=self._seed(liblinear_rng),
        )
        # ---- 2. final fits on fresh balanced subsamples of the whole retraining split
        coefs, intercepts = [], []
        self.final_indices = []
        for i in range(self.n_fits):
            idx = group_balanced_subsample(g, ctx.rng(f"{salt}/final/{i}"))
            self.final_indices.append(idx)
            coef, intercept, bad = fit_l1_logreg(
                self.scaler.transform(x[idx]), y[idx], n_classes, best_c,
                max_iter=self.max_iter, random_state=self._seed(liblinear_rng),
            )
            unconverged += bad
            coefs.append(coef)
            intercepts.append(intercept)
        self.C = best_c
        calls_per_fit = 1 if n_classes == 2 else n_classes  # one-vs-rest beyond two classes
        n_total_fits = calls_per_fit * (len(self.c_grid) + self.n_fits)
        if unconverged:
            warnings.warn(
                f"{self.name}: {unconverged} of {n_total_fits} liblinear fits did not converge in "
                f"max_iter={self.max_iter}; raise --dfr_max_iter",
                ConvergenceWarning,
                stacklevel=3,
            )
        final_size = int(self.final_indices[0].size)
        halves = [f"{salt}/halves"] if self.selection_split == self.fit_split else []
        self.info.update({
            "selection_size": int(len(y_sel)),
            "selection_worst_group_acc": scores,
            "tuning_size": int(tune_idx.size),
            "tuning_group_size": int(tune_idx.size // max(1, np.unique(g[tune_idx]).size)),
            "final_subsample_size": final_size,
            "final_group_size": int(final_size // max(1, np.unique(g).size)),
            "retrain_split_size": int(len(y)),
            "empty_groups": empty,
            "seed": int(ctx.seed),
            "rng_salts": [*halves, f"{salt}/tune_balance", f"{salt}/final/<i>", f"{salt}/liblinear"],
            "subsample_digest": _digest(tune_idx, self.selection_indices, *self.final_indices),
            "convergence_warnings": int(unconverged),
        })
        return np.mean(coefs, axis=0), np.mean(intercepts, axis=0)

    def hyperparameters(self) -> dict[str, Any]:
        base = super().hyperparameters()
        return {
            "variant": self.paper_name,
            "retrain_split": self.fit_split,
            "selection_split": self.selection_split,
            "grouping": self.grouping,
            "C": self.C,
            "c_grid": list(self.c_grid),
            "n_fits": self.n_fits,
            "penalty": "l1",
            "solver": "liblinear",
            "max_iter": self.max_iter,
            "standardize": self.standardize_text,
            **self.info,
            **({"labels_read": base["labels_read"]} if "labels_read" in base else {}),
        }


class DFRTrain(DFR):
    """DFR^Tr_Tr: retrain on (group-balanced) train, select C on the whole val split."""

    name = NAME_TRAIN
    paper_name = "DFR^Tr_Tr"
    needs = Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"}))
    description = "DFR^Tr_Tr: L1 logistic regression on group-balanced train embeddings, C by val worst-group acc"
    standardize_text = "StandardScaler fitted on all of train (C selection, final fits and prediction)"


# --------------------------------------------------------------------------- label-free variant
# A deviation from DFR, which balances val by its group labels: here val's "groups" are (class,
# whether an ERM head fitted on train gets the sample right), in the spirit of JTT's error sets;
# docs/methods/dfr_labelfree.md.  It shares the --dfr_* flags, so it lives in this plugin.
NAME_LABELFREE = "dfr_labelfree"


def inferred_groups(y: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Group id ``2 * y + wrong``: per class, the samples stage 1 gets right (0) and wrong (1)."""
    return 2 * np.asarray(y, dtype=np.int64) + np.asarray(wrong, dtype=np.int64)


class DFRLabelFree(DFR):
    """DFR^Val_Tr on val, balanced over (class x stage-1 right/wrong) instead of the true groups."""

    name = NAME_LABELFREE
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


# --------------------------------------------------------------------------- plugin
@hookimpl
def register_mitigations(register):
    register(DFR.spec())
    register(DFRTrain.spec())
    register(DFRLabelFree.spec())
