"""The ``cfr`` model type: a base open_clip model with a fitted CFR head from a state file."""

from __future__ import annotations

import torch

from ...states import load_base_model
from .config import NAME
from .heads import apply_head


def load_model(model_name: str, pretrained: str, cache_dir: str | None = None, device: str | torch.device = "cpu", *,
               registry=None):
    """``STATE`` (``pretrained``) is a ``<output>_state_cfr.safetensors`` file; its metadata names the
    base model and checkpoint, loaded through the recorded ``--model_type``.  Returns
    ``(model, transform, tokenizer)``."""
    from .training import CFR

    state, model, transform, tokenizer = load_base_model(pretrained, NAME, model_name, cache_dir, device, registry)
    cfr = CFR()
    cfr.load_state_dict(state.tensors)
    model = apply_head(model, cfr.head_type, cfr.head_state)
    return model.to(device).eval(), transform, tokenizer
