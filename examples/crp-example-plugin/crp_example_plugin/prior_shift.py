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

Zero-shot logits are linear in the image features (``100 * x @ head``), so the method is
a :class:`~clip_robust_plugins.LinearHead` whose weights are the zero-shot head and whose
intercept is ``b``: prediction, the saved state and classes absent from val come from the
base class, and the fit split is declared once, in ``needs``.
"""

from __future__ import annotations

from dataclasses import dataclass

from clip_robust_plugins import LinearHead, Needs, option

NAME = "example_prior_shift"


@dataclass(frozen=True)
class PriorShiftConfig:
    """The ``--example_prior_shift_*`` flags."""

    reg: float = option(1e-4, "L2 penalty on the per-class bias")
    max_iter: int = option(100, "L-BFGS iteration cap")


class PriorShift(LinearHead):
    """Zero-shot head plus a fitted per-class bias (the intercept, mean zero)."""

    name = NAME
    needs = Needs(fit_splits=("val",), labels=frozenset({"class"}))
    Config = PriorShiftConfig
    option_prefix = "example_prior_shift_"
    description = "per-class bias on zero-shot logits so predicted class frequencies match val's (class labels only)"
    citation = "Saerens et al., Adjusting the Outputs of a Classifier to New a Priori Probabilities, Neural Computation 2002"

    def fit_head(self, x, y, groups, ctx):
        import torch

        weights = 100.0 * ctx.zeroshot_head().double().cpu().T  # (C, D): zero-shot logits are x @ weights.T
        z = torch.from_numpy(x) @ weights.T
        counts = torch.bincount(torch.from_numpy(y), minlength=ctx.n_classes).double()
        pi = counts / counts.sum()
        b = torch.zeros(ctx.n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([b], lr=1.0, max_iter=self.config.max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-12)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.logsumexp(z + b, dim=1).mean() - (pi * b).sum() + 0.5 * self.config.reg * (b * b).sum()
            loss.backward()
            return loss

        opt.step(closure)
        bias = b.detach()
        bias = bias - bias.mean()  # a common shift changes no prediction
        self.info = {"target_class_prior": [round(float(p), 6) for p in pi],
                     "bias": [round(float(v), 4) for v in bias]}
        return weights.numpy(), bias.numpy()


#: the record ``register_mitigations`` registers (name, needs, flags and create come from the class)
SPEC = PriorShift.spec()
