"""What the fine-tuning loss sees of a train sample: the preprocessed image and its regions as
patch-token weights (ViT), masked-in-place images (same scale as the image) or up-scaled crops."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ...datasets.base import SampleImage
from .proposers import proposed_boxes


def token_regions_supported(model: torch.nn.Module) -> bool:
    """True for open_clip ViT towers whose patch tokens can be pooled into region embeddings.

    Needs ``output_tokens`` support, a projection, no attentional pooler and no patch dropout
    (which would drop tokens while training).
    """
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    return (isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None
            and isinstance(getattr(visual, "proj", None), torch.nn.Parameter)
            and isinstance(getattr(visual, "patch_dropout", None), torch.nn.Identity)
            and hasattr(visual, "output_tokens") and hasattr(visual, "patch_size"))


def region_feature_mode(requested: str, model: torch.nn.Module) -> str:
    """``tokens``, ``masked`` or ``crops`` for the fine-tuning loss (``auto``: tokens where the tower allows, else masked)."""
    if requested in ("crops", "masked"):
        return requested
    if token_regions_supported(model):
        return "tokens"
    if requested == "tokens":
        raise ValueError(f"--ravl_region_features tokens needs an open_clip ViT tower; this one is "
                         f"{type(getattr(model, 'visual', model)).__name__} (use auto, masked or crops)")
    return "masked"


class TrainViews:
    """Sample transform for fine-tuning: the preprocessed image and, for RaVL, what its region terms need.

    ``tokens``: per region, the share of each ViT patch it covers in the *preprocessed* image,
    found by sending a white box on black through the same transform (so any resize/crop
    geometry is followed exactly).  ``masked``: per region, the preprocessed image with every
    pixel the region does not cover set to zero (the normalisation mean), at the image's own
    scale.  ``crops``: each region cropped and preprocessed on its own (up-scaled).
    """

    wants_sample = True

    def __init__(self, transform: Callable, proposer: Callable | None, mode: str = "crops",
                 patch: tuple[int, int] = (1, 1)):
        self.transform = transform
        self.proposer = proposer
        self.mode = mode
        self.patch = patch

    def coverage(self, sample: SampleImage, boxes) -> torch.Tensor:
        """(R, H, W) share of each preprocessed pixel covered by each box (memoised per image size and boxes:
        a grid gives every image of one size the same boxes)."""
        size = sample.image.size
        key = (size, tuple(boxes))
        memo = self.__dict__.setdefault("_coverage", {})
        if key not in memo:
            if len(memo) >= 64:
                memo.clear()
            memo[key] = self._coverage_of(size, boxes)
        return memo[key]

    def _coverage_of(self, size: tuple[int, int], boxes) -> torch.Tensor:
        black = self.transform(Image.new("RGB", size))[0]
        white = self.transform(Image.new("RGB", size, (255, 255, 255)))[0]
        cover = []
        for box in boxes:
            canvas = Image.new("RGB", size)
            canvas.paste((255, 255, 255), box)
            cover.append(((self.transform(canvas)[0] - black) / (white - black)).clamp(0, 1))
        return torch.stack(cover)

    def __call__(self, sample: SampleImage) -> dict[str, torch.Tensor]:
        image = self.transform(sample.image)
        if self.proposer is None:
            return {"views": image.unsqueeze(0)}
        boxes, valid = proposed_boxes(self.proposer, sample)
        if self.mode == "crops":
            views = [image] + [self.transform(sample.image.crop(b)) for b in boxes]
            return {"views": torch.stack(views), "valid": torch.tensor(valid)}
        cover = self.coverage(sample, boxes)
        if self.mode == "masked":
            inside = (cover >= 0.5).to(image.dtype)[:, None]  # (R, 1, H, W)
            valid = torch.tensor(valid) & (inside.flatten(1).sum(1) > 0)
            return {"views": torch.cat([image[None], image[None] * inside]), "valid": valid}
        weights = F.avg_pool2d(cover[:, None], self.patch, self.patch)[:, 0]  # (R, gh, gw)
        valid = torch.tensor(valid) & (weights.flatten(1).sum(1) > 0)
        return {"views": image.unsqueeze(0), "valid": valid, "weights": weights}


def encode_with_token_regions(model: torch.nn.Module, images: torch.Tensor,
                              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings (B, D) and region embeddings (B, R, D) from one forward of an open_clip ViT.

    A region's embedding is the coverage-weighted mean of its patch tokens, passed through the
    tower's own head (``ln_post`` where the tower applies it after pooling, then ``proj``), the
    path the pooled token takes; ``weights`` is (B, R, gh, gw).
    """
    visual = model.visual
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = False
    w = weights.flatten(2).to(tokens.dtype)  # (B, R, gh*gw)
    regions = (w @ tokens) / w.sum(-1, keepdim=True).clamp_min(1e-6)  # (B, R, width)
    if getattr(visual, "final_ln_after_pool", False):
        regions = visual.ln_post(regions)
    return pooled, regions @ visual.proj

