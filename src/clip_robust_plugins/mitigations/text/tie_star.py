"""TIE* (Lu et al., ICLR 2025): each image's spurious value inferred zero-shot, its text
direction subtracted with a scale estimated on the (unlabelled) train features.  Protocol
and deviations: docs/methods/tie_star.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...argtypes import option
from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from . import linalg
from .common import SCALE, TextMethod, as_tensor, averaged, head_rows, image_rows
from .prompts import PromptConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "tie_star"
FIT_SPLIT = "train"


@dataclass(frozen=True)
class TieConfig(PromptConfig):
    spurious_templates: tuple[str, ...] = option(("a photo with a {a} background",),
                                                 "templates of the spurious prompts ({a}: value)")


class TieStar(TextMethod):
    name = NAME
    prompt_parts = ("spurious",)

    def _fit(self, ctx, prompts):
        directions = averaged(ctx, list(prompts.spurious))
        scales, counts = linalg.tie_scales(image_rows(ctx, FIT_SPLIT), directions)
        self.counts = [int(c) for c in counts]
        return {"directions": as_tensor(directions), "scales": as_tensor(scales),
                "class_embeddings": as_tensor(head_rows(ctx))}

    def predict(self, ctx, split: str) -> torch.Tensor:
        x = linalg.tie_transform(image_rows(ctx, split), self._need("directions").double().numpy(),
                                 self._need("scales").double().numpy())
        x = x / (x ** 2).sum(axis=1, keepdims=True) ** 0.5
        return as_tensor(SCALE * x @ self._need("class_embeddings").double().numpy().T)

    def _settings(self):
        scales = self.state.get("scales")
        return {**super()._settings(), "scale_split": FIT_SPLIT,
                "scales": None if scales is None else [round(float(s), 6) for s in scales],
                "inferred_counts": getattr(self, "counts", None)}


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=TieStar, needs=Needs(fit_splits=(FIT_SPLIT,)), options=TieConfig, option_prefix="tie_star_",
        description="spurious value inferred zero-shot; its text direction subtracted, scale from unlabelled train features",
        citation="Lu et al., Mitigating Spurious Correlations in Zero-Shot Multimodal Models, ICLR 2025 (code: lu876/TIE)",
    ))
