"""WiSE-FT, linear-head form: fine-tune a linear head from the zero-shot head on frozen train
features, then interpolate the two heads' weights and choose alpha on val."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..base import Mitigation, RunContext
from .config import NAME, WiseFTConfig
from .selection import choose_alpha, curve_row, curve_writer


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
        alpha, split = choose_alpha(curve, cfg.select, cfg.alpha)
        self.coef, self.intercept = interpolate(zs, ft, alpha)
        self._info = {"alpha": alpha, "selection": {"criterion": cfg.select, "split": split}, "curve": curve,
                      "train_loss_per_epoch": [round(v, 5) for v in losses],
                      "labels_read": ["class"] + ({"worst_group": ["group (val)"], "accuracy": ["class (val)"]}
                                                  .get(cfg.select, []))}

    def _curve(self, ctx: RunContext, zs, ft) -> list[dict[str, float]]:
        """Val scores at every alpha (labels only as the criterion needs them)."""
        val = ctx.features("val")
        x = val.features.float()
        return [curve_row(alpha, x @ coef.T + intercept, self.config.select, lambda: val.y.numpy(),
                          lambda: val.group_ids().numpy())
                for alpha in self.config.alphas for coef, intercept in [interpolate(zs, ft, alpha)]]

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
        return {"curve": curve_writer(self._info, "head")}
