"""What the six text-side methods share: prompts built before any work, recorded in the
results and in the state file, and logits from image features and fitted tensors."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from ..base import Mitigation, RunContext
from . import encode
from .prompts import PromptConfig, PromptSet, build_prompts

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the logit scale of zero-shot CLIP (clip_benchmark's 100)
SCALE = 100.0


class TextMethod(Mitigation):
    """A training-free method: prompts -> text tensors (the state) -> logits."""

    name = ""
    #: which parts of the PromptSet this method reads (recorded in hyperparameters)
    prompt_parts: tuple[str, ...] = ()

    def __init__(self, config: PromptConfig):
        self.config = config
        self.prompts: PromptSet | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.recorded: dict[str, Any] | None = None  # prompts JSON (also restored from a state)

    def check(self, ctx: RunContext) -> None:
        self.prompts = build_prompts(self.config, ctx.classnames, ctx.templates, ctx.schema)

    def fit(self, ctx: RunContext) -> None:
        if self.prompts is None:
            self.check(ctx)
        self.recorded = self.prompts.to_json(self.prompt_parts)
        self.state = self._fit(ctx, self.prompts)

    def _fit(self, ctx: RunContext, prompts: PromptSet) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _need(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise RuntimeError(f"{self.name}: predict() before fit()")
        return self.state[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        import torch

        blob = json.dumps(self.recorded or {}).encode()
        return {**self.state, "prompts_json": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        blob = state.pop("prompts_json", None)
        self.recorded = json.loads(bytes(blob.numpy()).decode()) if blob is not None and blob.numel() else None
        self.state = {k: v.float() for k, v in state.items()}

    def hyperparameters(self) -> dict[str, Any]:
        return {"labels_used": [], **self._settings(), "prompts": self.recorded}

    def _settings(self) -> dict[str, Any]:
        return {"prompt_file": self.config.prompt_file or None, "group_phrase": self.config.group_phrase,
                "spurious_templates": list(self.config.spurious_templates)}


def text_matrix(ctx: RunContext, prompts: list[str]) -> np.ndarray:
    """Normalised prompt embeddings, (P, D) float64."""
    return encode.encode_texts(ctx, prompts).double().numpy()


def averaged(ctx: RunContext, groups: list[tuple[str, ...]]) -> np.ndarray:
    """One row per group of prompts: the normalised mean of their normalised embeddings
    (clip_benchmark's template averaging), (G, D)."""
    flat = [p for g in groups for p in g]
    emb = text_matrix(ctx, flat)
    rows, start = [], 0
    for g in groups:
        mean = emb[start:start + len(g)].mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
        start += len(g)
    return np.stack(rows)


def head_rows(ctx: RunContext) -> np.ndarray:
    """The zero-shot head as (C, D) float64 rows."""
    return ctx.zeroshot_head().float().cpu().double().numpy().T


def image_rows(ctx: RunContext, split: str) -> np.ndarray:
    return ctx.features(split).features.double().numpy()


def as_tensor(x: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
