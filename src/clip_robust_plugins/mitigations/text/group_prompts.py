"""Group prompts: one prompt per (class, spurious value); a class scores the max (or
log-sum-exp) over its prompts.  Protocol and deviations: docs/methods/group_prompts.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...argtypes import option
from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from . import linalg
from .common import SCALE, TextMethod, as_tensor, averaged, image_rows
from .prompts import PromptConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "group_prompts"


@dataclass(frozen=True)
class GroupPromptsConfig(PromptConfig):
    reduce: str = option("max", "how a class's group scores combine", choices=("max", "logsumexp"))


class GroupPrompts(TextMethod):
    name = NAME
    prompt_parts = ("group",)

    def _fit(self, ctx, prompts):
        rows = averaged(ctx, [g for per_class in prompts.group for g in per_class])  # class-major
        return {"group_embeddings": as_tensor(rows)}

    def predict(self, ctx, split: str) -> torch.Tensor:
        emb = self._need("group_embeddings").double().numpy()
        logits = SCALE * image_rows(ctx, split) @ emb.T
        return as_tensor(linalg.group_scores(logits, ctx.n_classes, self.config.reduce))

    def _settings(self):
        return {**super()._settings(), "reduce": self.config.reduce}


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=GroupPrompts, needs=Needs(), options=GroupPromptsConfig, option_prefix="group_prompts_",
        description="zero-shot with one prompt per (class, spurious value); class score = max or log-sum-exp (no labels)",
        citation="the Group-Prompt baseline of Adila et al., Zero-Shot Robustification of Zero-Shot Models, ICLR 2024",
    ))
