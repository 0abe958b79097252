"""The linear-head base: a method that fits ``logits = x @ coef.T + intercept`` on cached features.

A subclass sets ``name`` and ``needs`` (the spec passes ``needs=TheHead.needs``, so the fit
split and the labels are declared once) and writes one :meth:`LinearHead.fit_head`.  The base
reads the features of ``needs.fit_splits[0]``, hands group ids only to heads that declared
``"group"`` labels, turns sklearn's one-row binary form into two class rows, gives a class
absent from the fit split a very low logit, and owns prediction, safetensors state and the
recorded hyperparameters.  Importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from ..records import Needs
from .base import Mitigation, RunContext

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

#: the logit of a class absent from the fit split: finite (non-finite logits are an error), never the argmax
NEVER = -1e9


class LinearHead(Mitigation):
    """A linear classifier on L2-normalised image embeddings of the declared fit split."""

    name: str = "linear_head"
    needs: Needs = Needs(fit_splits=("train",), labels=frozenset({"class"}))

    def __init__(self, config: Any = None):
        self.config = config
        self.coef: torch.Tensor | None = None  # (C, D) float32
        self.intercept: torch.Tensor | None = None  # (C,) float32
        #: JSON-able facts of the fit a subclass records (recorded under hyperparameters)
        self.fit_info: dict[str, Any] = {}

    @property
    def fit_split(self) -> str:
        if not self.needs.fit_splits:
            raise ValueError(f"{self.name}: a linear head must declare Needs.fit_splits")
        return self.needs.fit_splits[0]

    @abstractmethod
    def fit_head(self, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, ctx: RunContext) -> tuple[Any, Any]:
        """``(coef, intercept)`` (numpy or torch) with one row per class, per class present in
        ``y`` (sorted, sklearn's ``classes_``), or one row for two present classes (sklearn's
        binary form).  ``groups`` is None unless ``needs.labels`` holds ``"group"``."""

    def fit(self, ctx: RunContext) -> None:
        import numpy as np
        import torch

        fs = ctx.features(self.fit_split)
        x, y = fs.features.numpy(), fs.y.numpy()
        groups = fs.group_ids().numpy() if "group" in self.needs.labels else None
        coef, intercept = self.fit_head(x, y, groups, ctx)
        coef, intercept = _to_numpy(coef), _to_numpy(intercept).reshape(-1)
        coef, intercept = self._class_rows(coef, intercept, np.unique(y), ctx.n_classes, x.shape[1])
        self.coef = torch.from_numpy(coef).float()
        self.intercept = torch.from_numpy(intercept).float()

    def _class_rows(self, coef: np.ndarray, intercept: np.ndarray, present: np.ndarray, n_classes: int,
                    dim: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        if coef.ndim != 2 or coef.shape[1] != dim or intercept.shape[0] != coef.shape[0]:
            raise ValueError(f"{self.name}: fit_head returned coef {coef.shape} and intercept {intercept.shape} "
                             f"for {dim}-dimensional features")
        full_coef, full_intercept = np.zeros((n_classes, dim)), np.zeros(n_classes)
        rows = coef.shape[0]
        if rows == 1 and len(present) == 2:  # sklearn's binary form: one row for present[1]
            full_coef[present[1]], full_intercept[present[1]] = coef[0] / 2, intercept[0] / 2
            full_coef[present[0]], full_intercept[present[0]] = -coef[0] / 2, -intercept[0] / 2
        elif rows == n_classes:
            full_coef[:], full_intercept[:] = coef, intercept
        elif rows == len(present):
            full_coef[present], full_intercept[present] = coef, intercept
        else:
            raise ValueError(f"{self.name}: fit_head returned {rows} rows for {n_classes} classes "
                             f"({len(present)} present in split {self.fit_split!r})")
        absent = np.setdiff1d(np.arange(n_classes), present)
        full_coef[absent], full_intercept[absent] = 0.0, NEVER  # never predicted
        return full_coef, full_intercept

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        if self.coef is None:
            raise RuntimeError(f"{self.name}: predict() before fit()")
        x = ctx.features(split).features
        if x.shape[1] != self.coef.shape[1] or self.coef.shape[0] != ctx.n_classes:
            raise ValueError(f"{self.name}: the head is {tuple(self.coef.shape)} (classes x dim) but the run has "
                             f"{ctx.n_classes} classes and {x.shape[1]}-dimensional features")
        return x @ self.coef.T + self.intercept

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.coef is None:
            return {}
        return {"coef": self.coef.clone(), "intercept": self.intercept.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"coef", "intercept"}:
            raise ValueError(f"{self.name}: expected a state with tensors 'coef' and 'intercept', got {sorted(state)}")
        coef, intercept = state["coef"], state["intercept"]
        if coef.ndim != 2 or intercept.ndim != 1 or coef.shape[0] != intercept.shape[0]:
            raise ValueError(f"{self.name}: state coef {tuple(coef.shape)} and intercept {tuple(intercept.shape)} "
                             "do not form a (classes x dim) head")
        self.coef, self.intercept = coef.float().clone(), intercept.float().clone()

    def hyperparameters(self) -> dict[str, Any]:
        config = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}
        return {"fit_split": self.fit_split, **config, **self.fit_info}


def _to_numpy(a: Any) -> np.ndarray:
    import numpy as np

    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)
