"""``example_prior_shift``: a per-class bias on the zero-shot logits, fitted with class labels only.

Zero-shot CLIP often prefers some class names over others whatever the image (a
label-prior mismatch).  This method learns one bias per class, ``b``, from the val
split's zero-shot logits ``z`` and class labels, by minimising the cross-entropy of
``z + b`` over ``b`` alone (plus a tiny L2 term that keeps ``b`` finite)::

    F(b) = mean_i logsumexp(z_i + b) - sum_c pi_c b_c + reg / 2 * |b|^2

``F`` is convex and its gradient is ``q(b) - pi + reg * b``, where ``q(b)`` is the mean
predicted class distribution and ``pi`` the val class frequencies: at the optimum the
model predicts classes as often as they occur.  Groups are never read, so the method
needs only class labels, and it fits in milliseconds from cached features.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from clip_robust_plugins import Mitigation, MitigationSpec, Needs, RunContext

if TYPE_CHECKING:  # registering the plugin imports no torch; fit and predict import it when they run
    import torch

NAME = "example_prior_shift"
FIT_SPLIT = "val"


class PriorShift(Mitigation):
    """Zero-shot logits plus a fitted per-class bias (one tensor of state, ``bias``)."""

    def __init__(self, reg: float = 1e-4, max_iter: int = 100):
        self.reg = reg
        self.max_iter = max_iter
        self.bias: torch.Tensor | None = None  # (C,) float32, mean zero
        self.target: list[float] = []

    def fit(self, ctx: RunContext) -> None:
        import torch

        fs = ctx.features(FIT_SPLIT)
        z = ctx.zeroshot_logits(fs.features).double()
        counts = torch.bincount(fs.y, minlength=ctx.n_classes).double()
        pi = counts / counts.sum()
        b = torch.zeros(ctx.n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([b], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-12)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.logsumexp(z + b, dim=1).mean() - (pi * b).sum() + 0.5 * self.reg * (b * b).sum()
            loss.backward()
            return loss

        opt.step(closure)
        bias = b.detach()
        self.bias = (bias - bias.mean()).float()  # a common shift changes no prediction
        self.target = [round(float(p), 6) for p in pi]

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        if self.bias is None:
            raise RuntimeError(f"{NAME}: predict() before fit()")
        return ctx.zeroshot_logits(ctx.features(split).features) + self.bias

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.bias is None:
            return {}
        return {"bias": self.bias.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = set(state) - {"bias"}
        if unknown or "bias" not in state:
            raise ValueError(f"{NAME}: expected a state with one tensor 'bias', got {sorted(state)}")
        self.bias = state["bias"].float().clone()

    def hyperparameters(self) -> dict:
        return {
            "fit_split": FIT_SPLIT,
            "reg": self.reg,
            "max_iter": self.max_iter,
            "target_class_prior": self.target,
            "bias": [round(float(v), 4) for v in self.bias] if self.bias is not None else None,
        }


def create(options: argparse.Namespace) -> PriorShift:
    return PriorShift()


SPEC = MitigationSpec(
    name=NAME,
    create=create,
    needs=Needs(fit_splits=(FIT_SPLIT,), labels=frozenset({"class"})),
    description="per-class bias on zero-shot logits so predicted class frequencies match val's (class labels only)",
    citation="Saerens et al., Adjusting the Outputs of a Classifier to New a Priori Probabilities, Neural Computation 2002",
)
