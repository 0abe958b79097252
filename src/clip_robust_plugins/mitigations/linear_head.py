"""The linear-head base: a method that fits a linear classifier on cached image features.

A subclass declares its ``name`` and ``needs`` (``needs.fit_splits[0]`` is the split the head
is fitted on; later splits are for selection) and implements one method,
``fit_head(x, y, groups, ctx) -> (coef, intercept)``.  Everything else lives here once:
reading the fit split, standardisation, sklearn's one-row binary form turned into two class
rows, classes absent from the fit split (never predicted), prediction, the safetensors
state and its checks, and the hyperparameters recorded in the results.
Importing this module imports no torch, numpy or scikit-learn.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

from ..groups import DEFAULT_GROUPING
from ..specs import MitigationSpec, Needs
from .base import Mitigation, RunContext

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

#: the logit of a class absent from the fit split: finite (non-finite logits are an error), never the argmax
NEVER = -1e9


def class_rows(coef: Any, intercept: Any, classes: Any, n_classes: int, name: str = "linear head"):
    """``(coef (n_classes, D), intercept (n_classes,))`` float64 from a fitted head's rows.

    ``coef`` may have one row per class (``n_classes`` rows), one row per entry of
    ``classes`` (the sorted classes present in the fit data, as scikit-learn's
    ``classes_``), or, with two classes present, scikit-learn's single binary row ``w, b``
    for ``classes[1]``, which becomes ``(-w/2, -b/2), (w/2, b/2)`` (same decision, same
    probabilities).  Classes absent from ``classes`` get a zero row and the intercept
    :data:`NEVER`, so they are never predicted.
    """
    import numpy as np

    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(intercept, dtype=np.float64))
    classes = np.asarray(classes, dtype=np.int64)
    if intercept.shape != (coef.shape[0],):
        raise ValueError(f"{name}: fit_head returned coef {coef.shape} but intercept {intercept.shape}")
    out_coef = np.zeros((n_classes, coef.shape[1]))
    out_intercept = np.zeros(n_classes)
    if coef.shape[0] == n_classes:
        out_coef[:], out_intercept[:] = coef, intercept
    elif coef.shape[0] == len(classes):
        out_coef[classes], out_intercept[classes] = coef, intercept
    elif coef.shape[0] == 1 and len(classes) == 2:  # scikit-learn's binary form: one row for classes[1]
        out_coef[classes[1]], out_intercept[classes[1]] = coef[0] / 2, intercept[0] / 2
        out_coef[classes[0]], out_intercept[classes[0]] = -(coef[0] / 2), -(intercept[0] / 2)
    else:
        raise ValueError(
            f"{name}: fit_head returned {coef.shape[0]} rows for {n_classes} classes ({len(classes)} in the fit split)"
        )
    absent = np.setdiff1d(np.arange(n_classes), classes)
    out_coef[absent], out_intercept[absent] = 0.0, NEVER
    return out_coef, out_intercept


class LinearHead(Mitigation):
    """Base of the linear heads; a subclass implements :meth:`fit_head` only.

    Class attributes a subclass sets: ``name``, ``needs``, optionally ``Config`` (a frozen
    dataclass of :func:`~clip_robust_plugins.argtypes.option` fields) with ``option_prefix``,
    ``description``, ``citation``, ``needs_every_class``, ``standardize`` (fit a
    StandardScaler on the fit split; the head then applies to standardised features, and
    ``self.scaler`` is set during ``fit_head``) and ``state_scalars`` (attribute names saved
    in the state as 0-d tensors, e.g. a selected C).  ``MyHead.spec()`` is the
    :class:`MitigationSpec` to register.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs()
    Config: ClassVar[type | None] = None
    option_prefix: ClassVar[str] = ""
    description: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    standardize: ClassVar[bool] = False
    state_scalars: ClassVar[tuple[str, ...]] = ()
    #: refuse a fit split that lacks a class (instead of never predicting that class)
    needs_every_class: ClassVar[bool] = False
    #: the grouping whose group ids ``fit_head`` and :meth:`split_data` see
    grouping: ClassVar[str] = DEFAULT_GROUPING
    #: read the fit split's group labels (None: when ``needs.labels`` has "group"); False for
    #: methods that use group labels only to select hyperparameters on another split
    fit_split_groups: ClassVar[bool | None] = None
    #: the dtype of the features handed to ``fit_head`` (float32 halves the memory at CelebA scale)
    dtype: ClassVar[str] = "float64"

    def __init__(self, config: Any = None, **overrides: Any):
        if self.Config is not None:
            config = self.Config() if config is None else config
            config = dataclasses.replace(config, **overrides) if overrides else config
        elif overrides:
            raise TypeError(f"{self.name}: has no options, got {sorted(overrides)}")
        self.config = config
        self.coef: torch.Tensor | None = None  # (C, D) float64
        self.intercept: torch.Tensor | None = None  # (C,) float64
        self.scaler_mean: torch.Tensor | None = None  # (D,) float64, when standardize
        self.scaler_scale: torch.Tensor | None = None
        self.scaler = None  # the fitted sklearn StandardScaler, during and after fit
        self.chosen: dict[str, Any] = {}  # hyperparameters chosen during the fit, and on which split (choose())
        self.info: dict[str, Any] = {}  # anything else the fit reports
        self._labels_read: dict[str, set[str]] = {}
        for key in self.state_scalars:
            setattr(self, key, None)

    # ------------------------------------------------------------ registration
    @classmethod
    def spec(cls, **fields: Any) -> MitigationSpec:
        """The record to register; ``fields`` override or add :class:`MitigationSpec` fields."""
        if not cls.name or not cls.needs.fit_splits:
            raise TypeError(f"{cls.__name__}: a LinearHead declares a name and needs.fit_splits")
        base = dict(
            name=cls.name, create=cls._create, needs=cls.needs, description=cls.description,
            citation=cls.citation, options=cls.Config, option_prefix=cls.option_prefix,
        )
        return MitigationSpec(**{**base, **fields})

    @classmethod
    def _create(cls, config: Any) -> LinearHead:
        return cls(config) if cls.Config is not None else cls()

    # ------------------------------------------------------------------- data
    @property
    def fit_split(self) -> str:
        return self.needs.fit_splits[0]

    def split_data(self, ctx: RunContext, split: str, groups: bool | None = None):
        """``(x (N, D) in :attr:`dtype`, y int64 (N,), groups int64 (N,) or None)`` of ``split``.

        ``x`` may share memory with the cached features: never write to it.
        Group ids are read only when ``groups`` is true (default: when the method declared
        group labels); what was read is recorded in the hyperparameters (``labels_read``).
        """
        import numpy as np

        if groups is None:
            groups = "group" in self.needs.labels
        if split not in self.needs.fit_splits:
            raise ValueError(f"{self.name}: reads split {split!r}, which its needs do not declare "
                             f"(fit_splits {list(self.needs.fit_splits)})")
        if groups and "group" not in self.needs.labels:
            raise ValueError(f"{self.name}: reads the group labels of {split!r}, which its needs do not declare "
                             f"(labels {sorted(self.needs.labels)})")
        fs = ctx.features(split)
        x = fs.features.numpy().astype(self.dtype, copy=False)
        y = fs.y.numpy().astype(np.int64)
        g = fs.group_ids(self.grouping).numpy().astype(np.int64) if groups else None
        self._labels_read.setdefault(split, set()).update({"class", "group"} if groups else {"class"})
        return x, y, g

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Features as the head sees them (standardised with the fit split's scaler when ``standardize``)."""
        return self.scaler.transform(x) if self.scaler is not None else x

    def scores(self, x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        """Logits of a candidate head (``class_rows`` form) on raw features ``x``."""
        return self.transform(x) @ coef.T + intercept

    def choose(self, chosen: dict[str, Any], split: str, table: list[dict[str, Any]], by: str = "worst_group_acc") -> None:
        """Record hyperparameters chosen on ``split`` (``table``: every candidate with its score)."""
        self.chosen = {"chosen": chosen, "chosen_on": split, "chosen_by": by, "candidates": table}

    # -------------------------------------------------------------------- fit
    def fit_head(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, ctx: RunContext):
        """Return ``(coef, intercept)`` for features ``x`` of the fit split (see :func:`class_rows`)."""
        raise NotImplementedError

    def fit(self, ctx: RunContext) -> None:
        import numpy as np
        import torch

        if ctx.eval_split in self.needs.fit_splits:
            warnings.warn(
                f"{self.name}: evaluating on {ctx.eval_split!r}, a split it fits on; its numbers are not held out",
                UserWarning, stacklevel=2,
            )
        self.chosen, self.info, self._labels_read = {}, {}, {}
        x, y, g = self.split_data(ctx, self.fit_split, groups=self.fit_split_groups)
        classes = np.unique(y)
        missing = [ctx.classnames[c] for c in np.setdiff1d(np.arange(ctx.n_classes), classes)]
        if missing and self.needs_every_class:
            raise ValueError(f"{self.name}: class(es) {missing} have no samples in split {self.fit_split!r}; "
                             f"{self.name} fits on {self.fit_split!r} and needs every class there")
        if len(classes) < 2:
            names = [ctx.classnames[c] for c in classes]
            raise ValueError(f"{self.name}: split {self.fit_split!r} has samples of {names or 'no class'} only; "
                             "a linear head needs at least two classes")
        self.scaler = None
        if self.standardize:
            from sklearn.preprocessing import StandardScaler

            self.scaler = StandardScaler().fit(x)
        coef, intercept = self.fit_head(x, y, g, ctx)
        coef, intercept = class_rows(coef, intercept, classes, ctx.n_classes, self.name)
        self.coef, self.intercept = torch.from_numpy(coef), torch.from_numpy(intercept)
        if self.scaler is not None:
            self.scaler_mean = torch.from_numpy(self.scaler.mean_.astype(np.float64))
            self.scaler_scale = torch.from_numpy(self.scaler.scale_.astype(np.float64))

    # ---------------------------------------------------------------- predict
    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        import torch

        if self.coef is None:
            raise RuntimeError(f"{self.name}: predict() before fit()")
        x = ctx.features(split).features.to(torch.float64)
        if x.shape[1] != self.coef.shape[1]:
            raise ValueError(f"{self.name}: the head takes {self.coef.shape[1]}-dim features, "
                             f"split {split!r} has {x.shape[1]} (a state fitted with another model?)")
        if self.scaler_mean is not None:
            x = (x - self.scaler_mean) / self.scaler_scale
        return (x @ self.coef.T + self.intercept).float()

    # ------------------------------------------------------------------ state
    def _state_keys(self) -> list[str]:
        keys = ["coef", "intercept"]
        if self.standardize:
            keys += ["scaler_mean", "scaler_scale"]
        return keys + list(self.state_scalars)

    def state_dict(self) -> dict[str, torch.Tensor]:
        import torch

        if self.coef is None:
            raise RuntimeError(f"{self.name}: state_dict() before fit()")
        state = {k: getattr(self, k) for k in self._state_keys() if k not in self.state_scalars}
        for k in self.state_scalars:
            state[k] = torch.tensor(float(getattr(self, k)), dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        expected = self._state_keys()
        if set(state) != set(expected):
            raise ValueError(f"{self.name}: state has tensors {sorted(state)}, expected {sorted(expected)} "
                             "(a state of another method or version?)")
        tensors = {k: state[k].to(torch.float64) for k in expected}
        coef = tensors["coef"]
        d = coef.shape[1] if coef.ndim == 2 else -1
        ok = coef.ndim == 2 and tensors["intercept"].shape == (coef.shape[0],)
        ok = ok and all(tensors[k].shape == (d,) for k in ("scaler_mean", "scaler_scale") if k in tensors)
        ok = ok and all(tensors[k].ndim == 0 for k in self.state_scalars)
        if not ok:
            raise ValueError(f"{self.name}: inconsistent state shapes {({k: tuple(v.shape) for k, v in state.items()})}")
        for k in expected:
            setattr(self, k, float(tensors[k]) if k in self.state_scalars else tensors[k])

    # -------------------------------------------------------- hyperparameters
    def hyperparameters(self) -> dict[str, Any]:
        config = dataclasses.asdict(self.config) if self.config is not None else {}
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        out: dict[str, Any] = {"fit_split": self.fit_split, **config}
        if self.standardize:
            out["standardize"] = f"StandardScaler fitted on all of {self.fit_split!r}"
        out.update({k: getattr(self, k) for k in self.state_scalars})
        out.update(self.chosen)
        out.update(self.info)
        if self._labels_read:
            out["labels_read"] = {s: sorted(v) for s, v in sorted(self._labels_read.items())}
        return out
