"""Zero-shot CLIP: the baseline every run evaluates (a built-in plugin, registered like any other).

Scores are ``100 * normalize(image_embedding) @ text_head`` with clip_benchmark's own
text head and precision, so ``zeroshot/acc1`` equals ``clip_benchmark eval``'s acc1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..hookspecs import hookimpl
from ..specs import MitigationSpec, Needs
from .base import Mitigation, RunContext

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "zeroshot"


class ZeroShot(Mitigation):
    """Nothing to fit; keeps the model as it is."""

    def fit(self, ctx: RunContext) -> None:
        ctx.zeroshot_head()

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        return ctx.zeroshot_logits(ctx.features(split).features)

    def as_open_clip(self, ctx: RunContext) -> torch.nn.Module:
        return ctx.model


@hookimpl
def register_mitigations(register):
    register(
        MitigationSpec(
            name=NAME,
            create=lambda config: ZeroShot(),
            needs=Needs(),
            description="zero-shot CLIP with the dataset's class names and templates (the baseline)",
            citation="Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021",
            baseline=True,
        )
    )
