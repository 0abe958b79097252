"""What the image tower computes per kind: normalised embeddings, pre-projection features."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def encode_image_normalized(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """clip_benchmark's image features: ``F.normalize(model.encode_image(x), dim=-1)``."""
    return F.normalize(model.encode_image(images), dim=-1)


#: the trainable image "heads" :func:`projection_head_type` tells apart
HEAD_VIT_PROJ = "vit_proj"
HEAD_ATTNPOOL = "attnpool"
HEAD_ADAPTER = "adapter"
HEAD_TYPES = (HEAD_VIT_PROJ, HEAD_ATTNPOOL, HEAD_ADAPTER)


def projection_head_type(model: torch.nn.Module) -> str:
    """Which image head ``preproj`` features feed, and so what a method can train on them.

    - ``"vit_proj"``: an open_clip ``VisionTransformer`` (``model.visual.proj`` is a
      Parameter): ``encode_image(x) == preproj(x) @ visual.proj``;
    - ``"attnpool"``: an open_clip ``ModifiedResNet`` (``model.visual.attnpool``):
      ``encode_image(x) == visual.attnpool(preproj(x).view(-1, C, H, W))``, see
      :func:`attnpool_input_shape`;
    - ``"adapter"``: any other tower (timm, HF, a ViT without ``proj``, an already
      adapted model): ``preproj(x) == encode_image(x)``, so a method trains an adapter on
      the (unnormalised) image embedding.
    """
    visual = getattr(model, "visual", None)
    if visual is None:
        return HEAD_ADAPTER
    if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
        return HEAD_VIT_PROJ
    if isinstance(getattr(visual, "attnpool", None), torch.nn.Module):
        return HEAD_ATTNPOOL
    return HEAD_ADAPTER


def attnpool_input_shape(attnpool: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the feature map an open_clip ``AttentionPool2d`` takes (from its positional embedding)."""
    tokens, channels = attnpool.positional_embedding.shape
    side = int(round((tokens - 1) ** 0.5))
    if side * side != tokens - 1:
        raise ValueError(f"attnpool positional embedding of {tokens} tokens is not a square grid plus one")
    return channels, side, side


def preproj_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image features *before* the trainable projection head, (N, P) and not normalised.

    What they are depends on :func:`projection_head_type`:

    - ``vit_proj``: the pooled token (after ``ln_post``), i.e. what ``VisionTransformer``
      multiplies by ``proj``.  Computed by running the tower's own ``forward`` with
      ``proj`` set to None for the call (restored in a ``finally``), so pooling, patch
      dropout and norms are exactly the model's own.  Size: the tower width (768 for
      ViT-B, 1024 for ViT-L).
    - ``attnpool``: the ``layer4`` feature map that ``ModifiedResNet`` feeds to
      ``attnpool``, captured with a forward pre-hook and flattened from (C, H, W).  It
      is large: RN50 at 224 px gives 2048 x 7 x 7 = 100,352 floats (392 KiB) per image,
      so Waterbirds' 4,795 training images take about 1.9 GB of cache.
    - ``adapter``: ``model.encode_image(images)`` itself (not normalised).
    """
    head = projection_head_type(model)
    visual = getattr(model, "visual", None)
    if head == HEAD_VIT_PROJ:
        proj = visual.proj
        visual.proj = None
        try:
            out = visual(images)
        finally:
            visual.proj = proj
        pooled = out[0] if isinstance(out, tuple) else out  # output_tokens=True returns (pooled, tokens)
        return pooled
    if head == HEAD_ATTNPOOL:
        captured: list[torch.Tensor] = []

        def grab(module, args):
            captured.append(args[0])

        handle = visual.attnpool.register_forward_pre_hook(grab)
        try:
            visual(images)
        finally:
            handle.remove()
        return captured[-1].reshape(images.shape[0], -1)
    return model.encode_image(images)


#: feature kinds the extractor can compute; later methods add theirs here
FEATURE_KINDS: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "image": encode_image_normalized,
    "preproj": preproj_features,
}


def image_from_preproj(model: torch.nn.Module, preproj: torch.Tensor) -> torch.Tensor | None:
    """``image`` features from ``preproj`` without a second forward, where that is exact.

    For a ViT tower ``encode_image(x)`` is ``preproj(x) @ visual.proj``, the very matmul
    the tower does; other heads return None and are computed by their own forward.
    """
    if projection_head_type(model) != HEAD_VIT_PROJ:
        return None
    return F.normalize(preproj @ model.visual.proj, dim=-1)


#: kind -> (kind it can be derived from, derivation returning None when it cannot);
#: when both are requested for a split, the source is computed first and reused
DERIVED_KINDS: dict[str, tuple[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor | None]]] = {
    "image": ("preproj", image_from_preproj),
}


def _batch_features(model: torch.nn.Module, images: torch.Tensor, kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every requested kind for one batch, sources of derived kinds first."""
    sources = {DERIVED_KINDS[k][0] for k in kinds if k in DERIVED_KINDS}
    computed: dict[str, torch.Tensor] = {}
    for kind in sorted(kinds, key=lambda k: k not in sources):
        derived = None
        if kind in DERIVED_KINDS and DERIVED_KINDS[kind][0] in computed:
            source, derive = DERIVED_KINDS[kind]
            derived = derive(model, computed[source])
        computed[kind] = derived if derived is not None else FEATURE_KINDS[kind](model, images)
    return computed


def autocast(device: str, enabled: bool):
    """``torch.autocast`` on the device's type (bf16 on CPU, fp16 on CUDA), as clip_benchmark."""
    return torch.autocast(torch.device(device).type, enabled=enabled)


def zeroshot_classifier(model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str],
                        templates: Sequence[str] | dict[str, Sequence[str]], device: str, amp: bool) -> torch.Tensor:
    """The (D, C) zero-shot head, the same arithmetic in the same order as clip_benchmark 1.6's
    ``zero_shot_classifier`` (tested equal), without importing its module: that imports
    scikit-learn, 0.7 s of every cold eval (docs/performance.md).

    ``templates``: a list of ``{c}`` templates, or a dict of class name -> its own prompts (CuPL).
    """
    if not isinstance(templates, (list, tuple, dict)):
        raise ValueError("templates must be a list or a dict")
    columns = []
    with torch.no_grad(), autocast(device, amp):
        for classname in classnames:
            texts = templates[classname] if isinstance(templates, dict) else [t.format(c=classname) for t in templates]
            embedding = F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1).mean(dim=0)
            embedding /= embedding.norm()
            columns.append(embedding)
        return torch.stack(columns, dim=1).to(device)
