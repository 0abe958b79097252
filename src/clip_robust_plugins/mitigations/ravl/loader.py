"""Models of RaVL's package: the fine-tuning start (``--ravl_init``) and the ``ravl``/``clip_ft`` model types."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...states import StateError, load_base_model
from ..base import RunContext


def load_init_model(ctx: RunContext, checkpoint: str) -> torch.nn.Module:
    """``--model`` with ``checkpoint`` through the run's registry (open_clip, shipped tags resolved);
    it must have the evaluated model's architecture (same parameter names and shapes)."""
    loader = ctx.registry.model_loader("open_clip").bind(ctx.registry)
    try:
        model = loader(model_name=ctx.model_name, pretrained=checkpoint, cache_dir=ctx.model_cache_dir,
                       device=ctx.device)[0]
    except (RuntimeError, FileNotFoundError) as exc:
        raise ValueError(f"--ravl_init {checkpoint}: cannot load it for --model {ctx.model_name}: "
                         f"{str(exc).splitlines()[0]}") from None
    want = {k: tuple(v.shape) for k, v in ctx.model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise ValueError(f"--ravl_init {checkpoint}: not the architecture of the evaluated model (first difference: "
                         f"{diff[0]})")
    return model.eval()


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A saved state as (image tower, the rest of the start model or {}); other keys are a StateError."""
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    base = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
    if not visual or len(visual) + len(base) != len(state):
        raise StateError(f"not a fine-tuned image tower (keys {sorted(state)[:4]} ...)")
    return visual, base


def apply_state(model: torch.nn.Module, visual: Mapping[str, torch.Tensor],
                base: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Load a fine-tuned image tower (and, for a ``--ravl_init`` fit, the start model's other
    parameters) into ``model`` in place; a mismatch is a StateError."""
    dtype = next(model.visual.parameters()).dtype
    try:
        if base:
            full = model.state_dict()
            unknown = sorted(set(base) - set(full))
            if unknown:
                raise RuntimeError(f"unexpected key {unknown[0]!r}")
            full.update({k: v.to(full[k].dtype) for k, v in base.items()})
            model.load_state_dict(full)
        model.visual.load_state_dict({k: v.to(dtype) for k, v in visual.items()})
    except RuntimeError as exc:
        raise StateError(f"the fine-tuned image tower does not fit this model: {str(exc).splitlines()[0]}") from None
    return model


def apply_visual_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load a fine-tuned image tower into ``model`` (in place); a mismatch is a StateError."""
    return apply_state(model, state)


def load_finetuned_model(method: str, model_name: str, pretrained: str, cache_dir: str | None = None,
                         device: str | torch.device = "cpu", *, registry=None):
    """``--model_type ravl|clip_ft --model BASE --pretrained <output>_state_<method>.safetensors``."""
    state, model, transform, tokenizer = load_base_model(pretrained, method, model_name, cache_dir, device, registry)
    try:
        visual, base = split_state(state.tensors)
    except StateError as exc:
        raise StateError(f"{pretrained}: {exc}") from None
    visual = {k: v.float() for k, v in visual.items()}
    return apply_state(model, visual, base).to(device).eval(), transform, tokenizer
