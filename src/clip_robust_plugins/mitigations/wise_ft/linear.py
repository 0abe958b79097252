"""WiSE-FT, linear-head form: fine-tune a linear head from the zero-shot head on frozen train
features, then interpolate the two heads' weights and choose alpha on val."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ...metrics import worst_group_accuracy
from ..base import Mitigation, RunContext
from .config import NAME, WiseFTConfig


def finetune_head(x: torch.Tensor, y: torch.Tensor, coef0: torch.Tensor, config: WiseFTConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Cross-entropy fine-tuning of ``(coef, intercept)`` from ``(coef0, 0)``: AdamW, cosine schedule,
    seeded shuffles.  Returns the head and the mean loss per epoch."""
    coef = torch.nn.Parameter(coef0.clone())
    intercept = torch.nn.Parameter(torch.zeros(coef0.shape[0]))
    opt = torch.optim.AdamW([coef, intercept], lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(x) // config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    losses = []
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = torch.nn.functional.cross_entropy(x[idx] @ coef.T + intercept, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    return coef.detach(), intercept.detach(), losses


def interpolate(zs: tuple[torch.Tensor, torch.Tensor], ft: tuple[torch.Tensor, torch.Tensor],
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``theta_alpha = (1 - alpha) theta_zeroshot + alpha theta_finetuned`` for a (coef, intercept) head."""
    return (1 - alpha) * zs[0] + alpha * ft[0], (1 - alpha) * zs[1] + alpha * ft[1]


class WiseFTLinear(Mitigation):
    """The linear-head WiSE-FT (see docs/methods/wise_ft.md)."""

    def __init__(self, config: WiseFTConfig):
        self.config = config
        self.coef: torch.Tensor | None = None
        self.intercept: torch.Tensor | None = None
        self._info: dict[str, Any] = {}

    def check(self, ctx: RunContext) -> None:
        for split in ("train", "val"):
            if split not in ctx.dataset.splits():
                raise ValueError(f"{NAME}: dataset {ctx.dataset_name!r} has no {split!r} split")

    def fit(self, ctx: RunContext) -> None:
        cfg = self.config
        train = ctx.features("train")
        zs = (100.0 * ctx.zeroshot_head().float().cpu().T, torch.zeros(ctx.n_classes))  # clip_benchmark's logits
        ft_coef, ft_intercept, losses = finetune_head(train.features.float(), train.y.long(), zs[0], cfg,
                                                      ctx.torch_generator(NAME))
        ft = (ft_coef, ft_intercept)
        curve = self._curve(ctx, zs, ft)
        if cfg.select == "fixed":
            alpha, split = cfg.alpha, None
        else:
            key = "val_worst_group_acc" if cfg.select == "worst_group" else "val_acc"
            best = max(curve, key=lambda r: (r[key], -r["alpha"]))  # ties: the smaller alpha, nearer zero-shot
            alpha, split = best["alpha"], "val"
        self.coef, self.intercept = interpolate(zs, ft, alpha)
        self._info = {"alpha": alpha, "selection": {"criterion": cfg.select, "split": split}, "curve": curve,
                      "train_loss_per_epoch": [round(v, 5) for v in losses],
                      "labels_read": ["class"] + (["group (val)"] if cfg.select == "worst_group" else [])}

    def _curve(self, ctx: RunContext, zs, ft) -> list[dict[str, float]]:
        """Val accuracy (and, with worst-group selection, worst-group accuracy) at every alpha."""
        val = ctx.features("val")
        x, y = val.features.float(), val.y.numpy()
        groups = val.group_ids().numpy() if self.config.select == "worst_group" else None
        curve = []
        for alpha in self.config.alphas:
            coef, intercept = interpolate(zs, ft, alpha)
            pred = (x @ coef.T + intercept).argmax(1).numpy()
            row = {"alpha": float(alpha), "val_acc": float((pred == y).mean())}
            if groups is not None:
                row["val_worst_group_acc"] = worst_group_accuracy(pred, y, groups)
            curve.append(row)
        return curve

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        if self.coef is None:
            raise RuntimeError(f"{NAME}: predict() before fit()")
        return ctx.features(split).features.float() @ self.coef.T + self.intercept

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"coef": self.coef, "intercept": self.intercept}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"coef", "intercept"}:
            raise ValueError(f"{NAME}: state has keys {sorted(state)}, expected ['coef', 'intercept']")
        self.coef, self.intercept = state["coef"].float(), state["intercept"].float()

    def hyperparameters(self) -> dict[str, Any]:
        cfg = self.config
        return {"form": "linear head", "alphas": list(cfg.alphas), "select": cfg.select,
                "head_fit": {"init": "zero-shot head (100 x class text embeddings), zero bias", "loss": "cross-entropy",
                             "optimizer": "AdamW", "schedule": "cosine", "epochs": cfg.epochs, "lr": cfg.lr,
                             "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "split": "train"},
                **self._info}

    def plots(self) -> Mapping[str, Callable[[str], None]]:
        if not self._info.get("curve"):
            return {}
        return {"curve": curve_writer(self._info)}


def curve_writer(info: Mapping[str, Any]) -> Callable[[str], None]:
    """``writer(png_path)``: val accuracy (and worst-group accuracy) over alpha, the chosen alpha marked."""
    curve = [dict(r) for r in info["curve"]]
    alpha, selection = info["alpha"], dict(info["selection"])

    def write(path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        xs = np.array([r["alpha"] for r in curve])
        for key, style in (("val_acc", "--o"), ("val_worst_group_acc", "-o")):
            if key in curve[0]:
                ax.plot(xs, [r[key] for r in curve], style, ms=3, label=key)
        ax.axvline(alpha, color="k", lw=1, alpha=0.6)
        ax.set_xlabel("alpha (0: zero-shot head, 1: fine-tuned head)")
        ax.set_ylabel("val accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"WiSE-FT (linear head): alpha = {alpha:g} ({selection['criterion']}"
                     f"{' on ' + selection['split'] if selection['split'] else ''})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)

    return write
