"""An open_clip-compatible model whose image embeddings pass through a fitted adapter."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AdaptedCLIP(torch.nn.Module):
    """An open_clip-compatible model whose image embeddings pass through an adapter.

    Exposes ``encode_image``, ``encode_text``, ``logit_scale`` and ``forward`` like
    ``open_clip.CLIP``, so clip_benchmark tasks (zero-shot, retrieval, linear probe)
    run on a mitigated model.  The adapter maps the base model's image embedding to a
    new embedding in the same space; the text tower is the base model's, unchanged.
    """

    def __init__(self, base: torch.nn.Module, image_adapter: torch.nn.Module):
        super().__init__()
        self.base = base
        self.image_adapter = image_adapter

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.base.logit_scale

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_adapter(self.base.encode_image(image))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.base.encode_text(text, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()
