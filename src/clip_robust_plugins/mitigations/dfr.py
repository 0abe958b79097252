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

from ..argtypes import at_least, option, positive_float
from ..groups import DEFAULT_GROUPING
from ..hookspecs import hookimpl
from ..metrics import worst_group_accuracy
from ..records import MitigationSpec, Needs
from .base import Mitigation, RunContext

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from sklearn.linear_model import LogisticRegression

NAME_VAL = "dfr"
NAME_TRAIN = "dfr_train"
#: the authors' Waterbirds grid (``C_OPTIONS`` in dfr_evaluate_spurious.py)
DEFAULT_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
#: the authors' ``num_retrains`` defaults per variant
DEFAULT_N_FITS = {NAME_VAL: 20, NAME_TRAIN: 10}
#: scikit-learn's (and the authors') default for liblinear
DEFAULT_MAX_ITER = 100

_VARIANTS = {
    # name: (retraining split, selection split, paper name)
    NAME_VAL: ("val", "val", "DFR^Val_Tr"),
    NAME_TRAIN: ("train", "val", "DFR^Tr_Tr"),
}
_STANDARDIZE = {
    NAME_VAL: "C selection: StandardScaler fitted on the balanced tuning half; "
    "final fits and prediction: StandardScaler fitted on all of val",
    NAME_TRAIN: "StandardScaler fitted on all of train (C selection, final fits and prediction)",
}
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


def __getattr__(name: str) -> Any:
    if name == "L1_KWARGS":  # the former module constant, now computed on first use
        return dict(l1_kwargs())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    coef = np.zeros((n_classes, x.shape[1]))
    intercept = np.zeros(n_classes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if n_classes == 2:
            clf = _l1_logreg(C, max_iter, random_state).fit(x, y)
            coef[1], intercept[1] = clf.coef_[0] / 2, clf.intercept_[0] / 2
            coef[0], intercept[0] = -coef[1], -intercept[1]
        else:
            for k in range(n_classes):
                clf = _l1_logreg(C, max_iter, random_state).fit(x, (y == k).astype(np.int64))
                coef[k], intercept[k] = clf.coef_[0], clf.intercept_[0]
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
class DFR(Mitigation):
    """DFR^Val_Tr (``variant="dfr"``) or DFR^Tr_Tr (``variant="dfr_train"``); see docs/methods/dfr.md.

    After :meth:`fit`, the subsamples are kept for inspection: ``tuning_indices`` (the
    group-balanced rows the C grid was fitted on), ``selection_indices`` (rows of the
    selection split that C was scored on) and ``final_indices`` (one array per final
    fit), all row indices into the respective split's features.
    """

    def __init__(
        self,
        variant: str = NAME_VAL,
        c_grid: Sequence[float] = DEFAULT_C_GRID,
        n_fits: int | None = None,
        max_iter: int = DEFAULT_MAX_ITER,
        grouping: str = DEFAULT_GROUPING,
    ):
        if variant not in _VARIANTS:
            raise ValueError(f"unknown DFR variant {variant!r}; known: {sorted(_VARIANTS)}")
        c_grid = tuple(float(c) for c in c_grid)
        if not c_grid or any(not np.isfinite(c) or c <= 0 for c in c_grid):
            raise ValueError(f"{variant}: the C grid must be non-empty positive numbers, got {list(c_grid)}")
        n_fits = DEFAULT_N_FITS[variant] if n_fits is None else int(n_fits)
        if n_fits < 1:
            raise ValueError(f"{variant}: n_fits must be >= 1, got {n_fits}")
        if max_iter < 1:
            raise ValueError(f"{variant}: max_iter must be >= 1, got {max_iter}")
        self.name = variant
        self.retrain_split, self.select_split, self.paper_name = _VARIANTS[variant]
        self.c_grid = c_grid
        self.n_fits = n_fits
        self.max_iter = int(max_iter)
        self.grouping = grouping
        # fitted state
        self.C: float | None = None
        self.scaler_mean: torch.Tensor | None = None  # (D,) float64
        self.scaler_scale: torch.Tensor | None = None  # (D,) float64
        self.coef: torch.Tensor | None = None  # (n_classes, D) float64
        self.intercept: torch.Tensor | None = None  # (n_classes,) float64
        # what the fit did (for tests and the results JSON)
        self.tuning_indices: np.ndarray | None = None
        self.selection_indices: np.ndarray | None = None
        self.final_indices: list[np.ndarray] = []
        self._info: dict[str, Any] = {}

    # -------------------------------------------------------------- helpers
    def _seed(self, rng: np.random.Generator) -> int:
        return int(rng.integers(2**31 - 1))

    def _labels(self, ctx: RunContext, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fs = ctx.features(split)
        x = fs.features.numpy().astype(np.float64)
        y = fs.y.numpy().astype(np.int64)
        g = fs.group_ids(self.grouping).numpy().astype(np.int64)
        return x, y, g

    def _check_classes(self, ctx: RunContext, y: np.ndarray, split: str) -> None:
        counts = np.bincount(y, minlength=ctx.n_classes)
        missing = [ctx.classnames[c] for c in np.flatnonzero(counts[: ctx.n_classes] == 0)]
        if missing:
            raise ValueError(
                f"{self.name}: class(es) {missing} have no samples in split {split!r}; "
                f"{self.paper_name} retrains on {split!r} and needs every class there"
            )

    def _empty_groups(self, ctx: RunContext, g: np.ndarray, split: str) -> list[str]:
        names = ctx.schema.group_names(self.grouping)
        counts = np.bincount(g, minlength=len(names))
        empty = [names[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            warnings.warn(
                f"{self.name}: group(s) {empty} have no samples in split {split!r}; "
                "they are skipped when balancing (the other groups are balanced to the smallest non-empty one)",
                UserWarning,
                stacklevel=3,
            )
        return empty

    # ------------------------------------------------------------------ fit
    def fit(self, ctx: RunContext) -> None:
        import torch
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.preprocessing import StandardScaler

        if ctx.eval_split in (self.retrain_split, self.select_split):
            warnings.warn(
                f"{self.name}: evaluating on {ctx.eval_split!r}, a split {self.paper_name} fits on; "
                "its numbers are not held out",
                UserWarning,
                stacklevel=2,
            )
        n_classes = ctx.n_classes
        x, y, g = self._labels(ctx, self.retrain_split)
        self._check_classes(ctx, y, self.retrain_split)
        empty = self._empty_groups(ctx, g, self.retrain_split)
        salt = self.name
        liblinear_rng = ctx.rng(f"{salt}/liblinear")

        # ---- 1. choose C
        if self.name == NAME_VAL:
            tune_half, select_idx = split_halves(g, ctx.rng(f"{salt}/halves"))
            if select_idx.size == 0:
                raise ValueError(
                    f"{self.name}: split {self.retrain_split!r} is too small to halve (every group has one sample)"
                )
            tune_idx = tune_half[group_balanced_subsample(g[tune_half], ctx.rng(f"{salt}/tune_balance"))]
            tune_scaler = StandardScaler().fit(x[tune_idx])
            x_sel, y_sel, g_sel = x[select_idx], y[select_idx], g[select_idx]
            selection_desc = f"held-out half of {self.retrain_split!r} (disjoint from the tuning half)"
        else:
            tune_idx = group_balanced_subsample(g, ctx.rng(f"{salt}/tune_balance"))
            tune_scaler = StandardScaler().fit(x)
            x_sel, y_sel, g_sel = self._labels(ctx, self.select_split)
            select_idx = np.arange(len(y_sel))
            selection_desc = f"whole {self.select_split!r} split"
        self.tuning_indices, self.selection_indices = tune_idx, select_idx
        best_c, scores, unconverged = select_c(
            tune_scaler.transform(x[tune_idx]),
            y[tune_idx],
            tune_scaler.transform(x_sel),
            y_sel,
            g_sel,
            self.c_grid,
            n_classes,
            max_iter=self.max_iter,
            random_state=self._seed(liblinear_rng),
        )

        # ---- 2. final fits on fresh balanced subsamples of the whole retraining split
        scaler = StandardScaler().fit(x)
        coefs, intercepts = [], []
        self.final_indices = []
        for i in range(self.n_fits):
            idx = group_balanced_subsample(g, ctx.rng(f"{salt}/final/{i}"))
            self.final_indices.append(idx)
            coef, intercept, bad = fit_l1_logreg(
                scaler.transform(x[idx]), y[idx], n_classes, best_c,
                max_iter=self.max_iter, random_state=self._seed(liblinear_rng),
            )
            unconverged += bad
            coefs.append(coef)
            intercepts.append(intercept)

        self.C = best_c
        self.scaler_mean = torch.from_numpy(scaler.mean_.astype(np.float64))
        self.scaler_scale = torch.from_numpy(scaler.scale_.astype(np.float64))
        self.coef = torch.from_numpy(np.mean(coefs, axis=0))
        self.intercept = torch.from_numpy(np.mean(intercepts, axis=0))
        calls_per_fit = 1 if n_classes == 2 else n_classes  # one-vs-rest beyond two classes
        n_total_fits = calls_per_fit * (len(self.c_grid) + self.n_fits)
        if unconverged:
            warnings.warn(
                f"{self.name}: {unconverged} of {n_total_fits} liblinear fits did not converge in "
                f"max_iter={self.max_iter}; raise --dfr_max_iter",
                ConvergenceWarning,
                stacklevel=2,
            )
        final_size = int(self.final_indices[0].size)
        self._info = {
            "selection": selection_desc,
            "selection_size": int(len(y_sel)),
            "selection_worst_group_acc": scores,
            "tuning_size": int(tune_idx.size),
            "tuning_group_size": int(tune_idx.size // max(1, np.unique(g[tune_idx]).size)),
            "final_subsample_size": final_size,
            "final_group_size": int(final_size // max(1, np.unique(g).size)),
            "retrain_split_size": int(len(y)),
            "empty_groups": empty,
            "seed": int(ctx.seed),
            "rng_salts": [f"{salt}/halves", f"{salt}/tune_balance", f"{salt}/final/<i>", f"{salt}/liblinear"]
            if self.name == NAME_VAL
            else [f"{salt}/tune_balance", f"{salt}/final/<i>", f"{salt}/liblinear"],
            "subsample_digest": _digest(tune_idx, select_idx, *self.final_indices),
            "convergence_warnings": int(unconverged),
        }

    # -------------------------------------------------------------- predict
    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        import torch

        if self.coef is None:
            raise RuntimeError(f"{self.name}: predict() before fit()")
        x = ctx.features(split).features.to(torch.float64)
        z = (x - self.scaler_mean) / self.scaler_scale
        return (z @ self.coef.T + self.intercept).float()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        import torch

        if self.coef is None:
            raise RuntimeError(f"{self.name}: state_dict() before fit()")
        return {
            "scaler_mean": self.scaler_mean,
            "scaler_scale": self.scaler_scale,
            "coef": self.coef,
            "intercept": self.intercept,
            "C": torch.tensor(self.C, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        expected = {"scaler_mean", "scaler_scale", "coef", "intercept", "C"}
        if set(state) != expected:
            raise ValueError(f"{self.name}: state has keys {sorted(state)}, expected {sorted(expected)}")
        coef = state["coef"].to(torch.float64)
        d = coef.shape[1] if coef.ndim == 2 else -1
        shapes_ok = (
            coef.ndim == 2 and state["intercept"].shape == (coef.shape[0],)
            and state["scaler_mean"].shape == (d,) and state["scaler_scale"].shape == (d,) and state["C"].ndim == 0
        )
        if not shapes_ok:
            raise ValueError(f"{self.name}: inconsistent state shapes {({k: tuple(v.shape) for k, v in state.items()})}")
        self.coef = coef
        self.intercept = state["intercept"].to(torch.float64)
        self.scaler_mean = state["scaler_mean"].to(torch.float64)
        self.scaler_scale = state["scaler_scale"].to(torch.float64)
        self.C = float(state["C"])

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "variant": self.paper_name,
            "retrain_split": self.retrain_split,
            "selection_split": self.select_split,
            "grouping": self.grouping,
            "C": self.C,
            "c_grid": list(self.c_grid),
            "n_fits": self.n_fits,
            "penalty": "l1",
            "solver": "liblinear",
            "max_iter": self.max_iter,
            "standardize": _STANDARDIZE[self.name],
            **self._info,
        }


# --------------------------------------------------------------------------- plugin
def _create(variant: str):
    def create(config: DFRConfig) -> DFR:
        return DFR(variant=variant, c_grid=config.c_grid, n_fits=config.n_fits, max_iter=config.max_iter)

    return create


@hookimpl
def register_mitigations(register):
    labels = frozenset({"class", "group"})
    register(
        MitigationSpec(
            name=NAME_VAL,
            create=_create(NAME_VAL),
            options=DFRConfig,
            option_prefix="dfr_",
            needs=Needs(fit_splits=("val",), labels=labels),
            description="DFR^Val_Tr: L1 logistic regression on group-balanced val embeddings, C by held-out worst-group acc",
            citation=CITATION,
        )
    )
    register(
        MitigationSpec(
            name=NAME_TRAIN,
            create=_create(NAME_TRAIN),
            options=DFRConfig,
            option_prefix="dfr_",
            needs=Needs(fit_splits=("train", "val"), labels=labels),
            description="DFR^Tr_Tr: L1 logistic regression on group-balanced train embeddings, C by val worst-group acc",
            citation=CITATION,
        )
    )
