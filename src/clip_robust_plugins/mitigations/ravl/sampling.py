"""``--ravl_sampling upsample`` of ``clip_ft``: JTT-style upsampling of the train images a model (the
evaluated one, or the fine-tuning's start) misclassifies zero-shot, as weighted sampling with replacement over a streamed split
(protocol: docs/methods/ravl.md, "Robust fine-tuning baselines")."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

from ..base import RunContext


def upsample_weights(misclassified: np.ndarray, factor: float) -> tuple[np.ndarray, float]:
    """Sampling probabilities (sum 1): a misclassified image weighs ``factor`` x a correct one.

    ``factor`` 0 means ``n_correct / n_misclassified`` (the two sets weigh the same in total); with
    no misclassified (or no correct) image every image weighs the same.  Returns (p, factor used)."""
    wrong = np.asarray(misclassified, dtype=bool)
    n_wrong, n_right = int(wrong.sum()), int((~wrong).sum())
    if n_wrong == 0 or n_right == 0:
        return np.full(len(wrong), 1.0 / len(wrong)), 1.0
    used = float(factor) if factor > 0 else n_right / n_wrong
    weights = np.where(wrong, used, 1.0)
    return weights / weights.sum(), used


def epoch_counts(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How often each image is drawn in one epoch of ``len(p)`` draws with replacement (a
    WeightedRandomSampler's multiset, drawn from the run's local generator)."""
    return rng.multinomial(len(p), p)


def repeated(items: Iterable, counts: Mapping[str, int]) -> Iterator:
    """Each streamed ``(key, ...)`` item ``counts[key]`` times (0: left out); the shuffle buffer
    downstream spreads the copies."""
    for item in items:
        for _ in range(counts[item[0]]):
            yield item


def zero_shot_errors(ctx: RunContext, model: torch.nn.Module, checkpoint: str | None) -> tuple[tuple[str, ...], np.ndarray]:
    """(train keys, misclassified mask) of a model zero-shot on train.

    ``checkpoint`` None: the evaluated model, its cached train features and head.  Else ``model``,
    loaded from ``checkpoint``: its own train features (cached under that checkpoint, as a run
    with ``--pretrained CHECKPOINT`` would cache them) and its own text tower's head."""
    from ...features import FeatureExtractor
    from .training import logits_with_head, own_zeroshot_head

    if checkpoint is None:
        fs = ctx.features("train")
        logits = ctx.zeroshot_logits(fs.features)
    else:
        ext = ctx.extractor
        extractor = FeatureExtractor(model, ctx.transform, registry=ctx.registry, model_type=ext.model_type,
                                     model_name=ext.model_name, pretrained=checkpoint, device=ctx.device, amp=ctx.amp,
                                     batch_size=ext.batch_size, num_workers=ext.num_workers, cache=ext.cache,
                                     progress=ctx.progress)
        fs = extractor.extract(ctx.dataset, ctx.dataset_name, "train", ["image"])["image"]
        logits = logits_with_head(ctx, fs.features, own_zeroshot_head(ctx, model))
    wrong = (logits.argmax(1) != fs.y.long()).numpy()
    return tuple(fs.keys), wrong
