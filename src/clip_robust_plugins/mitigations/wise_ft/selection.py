"""The curve over alpha and the choice of alpha, shared by both WiSE-FT forms (docs/methods/wise_ft.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...accuracy import worst_group_accuracy


def normalised_entropy(logits: torch.Tensor) -> float:
    """Mean over rows of the softmax entropy divided by log C (0: one-hot, 1: uniform)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    h = -(logp.exp() * logp).sum(1)
    return float(h.mean()) / math.log(logits.shape[1])


def curve_row(alpha: float, logits: torch.Tensor, select: str, y: Callable[[], np.ndarray],
              groups: Callable[[], np.ndarray]) -> dict[str, float]:
    """One alpha's val scores; labels are read (``y()``, ``groups()``) only when the criterion needs them."""
    row: dict[str, float] = {"alpha": float(alpha)}
    if select in ("worst_group", "accuracy"):
        pred = logits.argmax(1).numpy()
        labels = y()
        row["val_acc"] = float((pred == labels).mean())
        if select == "worst_group":
            row["val_worst_group_acc"] = worst_group_accuracy(pred, labels, groups())
    else:
        row["val_entropy"] = normalised_entropy(logits)
    return row


def choose_alpha(curve: Sequence[Mapping[str, float]], select: str, fixed: float) -> tuple[float, str | None]:
    """(alpha, split that chose it): the best row (ties: the smaller alpha, nearer zero-shot), or ``fixed``."""
    if select == "fixed":
        return fixed, None
    if select == "entropy":
        best = min(curve, key=lambda r: (r["val_entropy"], r["alpha"]))
    else:
        key = "val_worst_group_acc" if select == "worst_group" else "val_acc"
        best = max(curve, key=lambda r: (r[key], -r["alpha"]))
    return best["alpha"], "val"


def curve_writer(info: Mapping[str, Any], form: str) -> Callable[[str], None]:
    """``writer(png_path)``: the val curve over alpha, the chosen alpha marked."""
    curve = [dict(r) for r in info["curve"]]
    alpha, selection = info["alpha"], dict(info["selection"])

    def write(path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        xs = np.array([r["alpha"] for r in curve])
        for key, style in (("val_acc", "--o"), ("val_worst_group_acc", "-o"), ("val_entropy", ":o")):
            if key in curve[0]:
                ax.plot(xs, [r[key] for r in curve], style, ms=3, label=key)
        ax.axvline(alpha, color="k", lw=1, alpha=0.6)
        ax.set_xlabel(f"alpha (0: zero-shot {form}, 1: fine-tuned {form})")
        ax.set_ylabel("val score")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"WiSE-FT ({form}): alpha = {alpha:g} ({selection['criterion']}"
                     f"{' on ' + selection['split'] if selection['split'] else ''})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)

    return write
