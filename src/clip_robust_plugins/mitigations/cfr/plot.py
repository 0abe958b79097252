"""The PNG of a CFR fit's curve (matplotlib is imported only when it is drawn)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def curve_writer(info: dict[str, Any]) -> Callable[[str], None]:
    """``writer(png_path)``: val scores per epoch (left axis), loss terms (right), selected epoch marked."""
    curve = [dict(row) for row in info["curve"]]
    selection = dict(info["selection"])

    def write(path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in curve]
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for key, style in (("val_worst_group_acc", "-"), ("val_class_balanced_acc", "--")):
            if key in curve[0]:
                ax.plot(epochs, [r[key] for r in curve], style, label=key)
        ax.set_xlabel("recalibration epoch")
        ax.set_ylabel("val accuracy")
        ax.set_ylim(0, 1.02)
        ax.axvline(selection["epoch"], color="k", lw=1, alpha=0.6)
        ax.set_title(f"CFR: epoch {selection['epoch']} kept ({selection['criterion']} on {selection['split']}: "
                     f"{selection['metric']} = {selection['value']:.3f})", fontsize=9)
        right = ax.twinx()
        for key in ("val_ce", "loss_ce", "loss_nce", "loss_supcon"):
            right.plot(epochs, [r[key] for r in curve], ":", lw=1, label=key)
        right.set_ylabel("loss")
        lines = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)

    return write
