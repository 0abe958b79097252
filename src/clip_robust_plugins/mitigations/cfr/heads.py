"""CFR's trainable image heads (initialised from the model) and how a fitted head goes back into it."""

from __future__ import annotations

import copy

import torch

from ...features import HEAD_ATTNPOOL, HEAD_VIT_PROJ, attnpool_input_shape, projection_head_type
from ...states import StateError
from ..adapted import AdaptedCLIP


class VitProjHead(torch.nn.Module):
    """``visual.proj`` of an open_clip ViT: ``e = h @ proj``."""

    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Parameter(proj.detach().clone().float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.proj


class AttnPoolHead(torch.nn.Module):
    """``visual.attnpool`` of an open_clip ModifiedResNet on the flattened layer4 map."""

    def __init__(self, attnpool: torch.nn.Module):
        super().__init__()
        self.attnpool = copy.deepcopy(attnpool).float()
        self.shape = attnpool_input_shape(attnpool)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attnpool(h.reshape(-1, *self.shape))


class ResidualAdapter(torch.nn.Module):
    """``e = x + W x + b`` on the image embedding, the identity at initialisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


def embed_dim(model: torch.nn.Module) -> int:
    """The width of ``model.encode_image``'s output (from the text head or the tower)."""
    visual = getattr(model, "visual", None)
    for attr in ("output_dim", "embed_dim"):
        if isinstance(getattr(visual, attr, None), int):
            return getattr(visual, attr)
    text_projection = getattr(model, "text_projection", None)
    if isinstance(text_projection, torch.Tensor):
        return text_projection.shape[-1]
    raise ValueError("cfr: cannot tell the image embedding width of this model")


def init_head(model: torch.nn.Module, dim: int | None = None) -> torch.nn.Module:
    """The trainable head of ``model``, initialised from it (see :func:`projection_head_type`)."""
    kind = projection_head_type(model)
    if kind == HEAD_VIT_PROJ:
        return VitProjHead(model.visual.proj)
    if kind == HEAD_ATTNPOOL:
        return AttnPoolHead(model.visual.attnpool)
    return ResidualAdapter(dim if dim is not None else embed_dim(model))


def apply_head(model: torch.nn.Module, head_type: str, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Put a fitted head into ``model`` (in place for ViT/ResNet); returns the open_clip-compatible model.

    ``tensors`` are the head's own state (``proj``; ``attnpool.*``; ``linear.*``).  For
    ``adapter`` heads the result is an :class:`~clip_robust_plugins.mitigations.adapted.AdaptedCLIP`
    around ``model``.  ``encode_text`` and ``logit_scale`` are never touched.
    """
    actual = projection_head_type(model)
    if actual != head_type:
        raise StateError(f"cfr: the state holds a {head_type!r} head, but this model's image head is {actual!r}")
    if head_type == HEAD_VIT_PROJ:
        proj = model.visual.proj
        if tuple(proj.shape) != tuple(tensors["proj"].shape):
            raise StateError(f"cfr: projection of shape {tuple(tensors['proj'].shape)} for a model with {tuple(proj.shape)}")
        with torch.no_grad():
            proj.copy_(tensors["proj"])
        return model
    if head_type == HEAD_ATTNPOOL:
        prefix = "attnpool."
        model.visual.attnpool.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return model
    weight = tensors["linear.weight"]
    adapter = ResidualAdapter(weight.shape[0])
    adapter.load_state_dict(tensors)
    device = next(model.parameters()).device
    return AdaptedCLIP(model, adapter.to(device)).eval()
