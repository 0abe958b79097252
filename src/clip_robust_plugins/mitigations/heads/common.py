"""What the robust heads share: standardised float32 features, and candidates scored on val."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..base import RunContext
from ..linear_head import LinearHead, class_rows


class RobustHead(LinearHead):
    """A :class:`LinearHead` on standardised float32 features, with val selection helpers."""

    standardize: ClassVar[bool] = True
    dtype: ClassVar[str] = "float32"

    @property
    def selection_split(self) -> str:
        """The split hyperparameters are chosen on (the last of ``needs.fit_splits``)."""
        return self.needs.fit_splits[-1]

    def score_candidates(
        self, ctx: RunContext, candidates: list[tuple[dict[str, Any], np.ndarray, np.ndarray]], classes: np.ndarray
    ) -> tuple[int, list[dict[str, Any]]]:
        """Worst-group accuracy of each ``(params, W, b)`` on the selection split (its group
        labels are read); returns the index of the first best and the table of scores."""
        from .solver import worst_group_acc

        x, y, g = self.split_data(ctx, self.selection_split, groups=True)
        z = self.transform(x)
        table = []
        for params, W, b in candidates:
            coef, intercept = class_rows(W, b, classes, ctx.n_classes, self.name)
            table.append({**params, "worst_group_acc": worst_group_acc(z @ coef.T + intercept, y, g)})
        best = int(np.argmax([row["worst_group_acc"] for row in table]))
        return best, table
