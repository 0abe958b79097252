"""Text embeddings of arbitrary prompts through the run's text tower, cached.

Raw ``model.encode_text`` outputs (float32, not normalised: RoboShot differences raw
embeddings) are memoised per run context and stored in the feature cache beside the
zero-shot head, keyed by model, checkpoint, precision and the prompt list, so a warm run
needs no model for them.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the cache-key kind of cached prompt embeddings
TEXT_KIND = "text_prompts"
BATCH = 256
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_texts(ctx: Any, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
    """(P, D) float32 CPU embeddings of ``texts`` (L2-normalised unless ``normalize`` is False)."""
    import torch
    import torch.nn.functional as F

    texts = list(texts)
    memo = _MEMO.setdefault(ctx, {})
    todo = list(dict.fromkeys(t for t in texts if t not in memo))
    if todo:
        for text, emb in zip(todo, _cached_or_encoded(ctx, todo)):
            memo[text] = emb
    out = torch.stack([memo[t] for t in texts]) if texts else torch.zeros(0, 0)
    return F.normalize(out, dim=-1) if normalize and len(texts) else out


def _cached_or_encoded(ctx: Any, texts: list[str]) -> torch.Tensor:
    cache = ctx.extractor.cache
    key = dataclasses.replace(ctx.extractor.head_key(texts, ["raw encode_text/1"]), kind=TEXT_KIND)
    emb, _ = cache.load_head(key)
    if emb is not None and emb.shape[0] == len(texts):
        return emb.float()
    emb = _encode(ctx, texts)
    cache.save_head(key, emb)
    return emb


def _encode(ctx: Any, texts: list[str]) -> torch.Tensor:
    import torch

    from ...features import autocast

    model, tokenizer = ctx.model, ctx.tokenizer
    parts = []
    with torch.no_grad(), autocast(ctx.device, ctx.amp):
        for start in range(0, len(texts), BATCH):
            tokens = tokenizer(texts[start:start + BATCH]).to(ctx.device)
            parts.append(model.encode_text(tokens).float().cpu())
    emb = torch.cat(parts)
    if not bool(torch.isfinite(emb).all()):
        raise ValueError("the text tower returned non-finite embeddings for the prompts")
    return emb
