"""Orth-Cali (Chuang et al. 2023): Orth-Proj calibrated so prompts that differ only in the
spurious value map close together.  Protocol and deviations: docs/methods/orth_cali.md."""

from __future__ import annotations

from dataclasses import dataclass

from ...argtypes import option
from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from . import linalg
from .common import as_tensor, head_rows, text_matrix
from .orth_proj import CITATION, OrthProj
from .prompts import PromptConfig, PromptSet

NAME = "orth_cali"


@dataclass(frozen=True)
class OrthCaliConfig(PromptConfig):
    lam: float = option(1000.0, "weight lambda of the pair-difference matrix (0 gives Orth-Proj)")


def pair_indices(prompts: PromptSet) -> tuple[list[str], list[tuple[int, int]]]:
    """Group prompts flattened, and the pairs (i, j): same class, same prompt position,
    different spurious value."""
    flat: list[str] = []
    index: dict[tuple[int, int, int], int] = {}
    for c, per_class in enumerate(prompts.group):
        for v, group in enumerate(per_class):
            for k, text in enumerate(group):
                index[(c, v, k)] = len(flat)
                flat.append(text)
    pairs = [
        (index[(c, v, k)], index[(c, w, k)])
        for c, per_class in enumerate(prompts.group)
        for v in range(len(per_class)) for w in range(v + 1, len(per_class))
        for k in range(min(len(per_class[v]), len(per_class[w])))
    ]
    return flat, pairs


class OrthCali(OrthProj):
    name = NAME
    prompt_parts = ("spurious", "group")

    def _fit(self, ctx, prompts):
        p0 = self._projection(ctx, prompts)
        flat, pairs = pair_indices(prompts)
        if pairs and self.config.lam:
            p = linalg.calibrated_projection(p0, linalg.pair_matrix(text_matrix(ctx, flat), pairs), self.config.lam)
        else:
            p = p0
        self.n_pairs = len(pairs)
        return {"class_embeddings": as_tensor(linalg.project_queries(head_rows(ctx), p))}

    def _settings(self):
        return {**super()._settings(), "lambda": self.config.lam, "pairs": getattr(self, "n_pairs", None)}


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=OrthCali, needs=Needs(), options=OrthCaliConfig, option_prefix="orth_cali_",
        description="Orth-Proj calibrated with the (class, value) prompt-pair differences, lambda 1000 (no labels)",
        citation=CITATION,
    ))
