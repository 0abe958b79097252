"""Streaming helpers of the fine-tuning: seeded shuffle, batches, caption table, a model's own zero-shot head."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ...features import autocast
from ..base import RunContext


def shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """A seeded streaming shuffle: a random item of a ``buffer_size`` window leaves each time one enters."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def caption_table(ctx: RunContext, model: torch.nn.Module) -> tuple[list[list[str]], torch.Tensor]:
    """Per class the captions (templates filled with the class name) and their frozen text embeddings (n, D)."""
    templates = ctx.templates
    captions = [list(templates[name]) if isinstance(templates, Mapping) else [t.format(c=name) for t in templates]
                for name in ctx.classnames]
    flat = [c for per_class in captions for c in per_class]
    with torch.no_grad(), autocast(ctx.device, ctx.amp):
        emb = model.encode_text(ctx.tokenizer(flat).to(ctx.device))
    return captions, F.normalize(emb.float(), dim=-1)


def own_zeroshot_head(ctx: RunContext, model: torch.nn.Module) -> torch.Tensor:
    """The (D, C) zero-shot head of ``model``'s own text tower, built as clip_benchmark builds it."""
    if model is ctx.model:
        return ctx.zeroshot_head()
    from ...features.towers import zeroshot_classifier

    was_training = model.training
    model.eval()
    try:
        head = zeroshot_classifier(model, ctx.tokenizer, ctx.classnames, ctx.templates, ctx.device, amp=ctx.amp)
    finally:
        model.train(was_training)
    return head.float().to(ctx.device)


def logits_with_head(ctx: RunContext, features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``100 * features @ head`` under the run's autocast, as clip_benchmark scores."""
    with torch.no_grad(), autocast(ctx.device, ctx.amp):
        logits = 100.0 * features.to(ctx.device) @ head
    return logits.float().cpu()
