"""Orth-Proj (Chuang et al. 2023): project the spurious prompts' directions out of the class
text embeddings.  Protocol and deviations: docs/methods/orth_proj.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from . import linalg
from .common import SCALE, TextMethod, as_tensor, head_rows, text_matrix
from .prompts import PromptConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

NAME = "orth_proj"
CITATION = ("Chuang et al., Debiasing Vision-Language Models via Biased Prompts, arXiv:2302.00070, 2023 "
            "(code: chingyaoc/debias_vl)")


class OrthProj(TextMethod):
    name = NAME
    prompt_parts = ("spurious",)

    def _projection(self, ctx, prompts):
        spurious = text_matrix(ctx, [p for per_value in prompts.spurious for p in per_value])
        return linalg.orth_projection(spurious)

    def _fit(self, ctx, prompts):
        p = self._projection(ctx, prompts)
        return {"class_embeddings": as_tensor(linalg.project_queries(head_rows(ctx), p))}

    def predict(self, ctx, split: str) -> torch.Tensor:
        emb = self._need("class_embeddings")
        return SCALE * ctx.features(split).features.float() @ emb.T


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=OrthProj, needs=Needs(), options=PromptConfig, option_prefix="orth_proj_",
        description="zero-shot head with the spurious prompts' span projected out (no labels)", citation=CITATION,
    ))
