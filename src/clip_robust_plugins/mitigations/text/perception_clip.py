"""PerceptionCLIP (An et al., ICLR 2024): infer the context (spurious value) first, then
classify marginalising over it.  Protocol and deviations: docs/methods/perception_clip.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...argtypes import option, positive_float
from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from . import linalg
from .common import SCALE, TextMethod, as_tensor, averaged, image_rows
from .prompts import PromptConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "perception_clip"


@dataclass(frozen=True)
class PerceptionConfig(PromptConfig):
    temperature: float = option(1.0, "temperature T of the context posterior p(z|x)", type=positive_float)
    infer: str = option("with_class", "p(z|x) from the class x context prompts (with_class) or from the "
                        "spurious prompts alone (without_class)", choices=("with_class", "without_class"))


class PerceptionCLIP(TextMethod):
    name = NAME

    @property
    def prompt_parts(self):
        return ("group",) if self.config.infer == "with_class" else ("group", "spurious")

    def _fit(self, ctx, prompts):
        state = {"group_embeddings": as_tensor(averaged(ctx, [g for per_class in prompts.group for g in per_class]))}
        if self.config.infer == "without_class":
            state["context_embeddings"] = as_tensor(averaged(ctx, list(prompts.spurious)))
        return state

    def predict(self, ctx, split: str) -> torch.Tensor:
        x = image_rows(ctx, split)
        joint = SCALE * x @ self._need("group_embeddings").double().numpy().T
        context = None
        if self.config.infer == "without_class":
            context = SCALE * x @ self._need("context_embeddings").double().numpy().T
        return as_tensor(linalg.perception_log_probs(joint, ctx.n_classes, self.config.temperature, context))

    def _settings(self):
        return {**super()._settings(), "temperature": self.config.temperature, "infer": self.config.infer,
                "logits": "log p(y|x)"}


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=PerceptionCLIP, needs=Needs(), options=PerceptionConfig, option_prefix="perception_clip_",
        description="class x context prompts; context posterior, then the class marginalised over it (no labels)",
        citation="An et al., More Context, Less Distraction: Zero-shot Visual Classification by Inferring and "
                 "Conditioning on Contextual Attributes, ICLR 2024 (code: umd-huang-lab/perceptionCLIP)",
    ))
