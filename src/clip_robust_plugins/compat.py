"""Running clip_benchmark 1.6.2 itself, unchanged, on today's stack.

Our CLI is a superset of ``clip_benchmark``: it reuses clip_benchmark's own argument
parser and its ``main_eval`` (model x dataset x language expansion, output naming,
``--distributed`` run splitting) and ``main_build``.  For the time of one command,
:func:`clip_benchmark_patched` changes three things in clip_benchmark's modules and
restores them afterwards:

1. ``zeroshot_classification.accuracy``: 1.6.2 calls ``float()`` on a one-element
   array, which numpy >= 2.4 rejects; the replacement computes the same numbers.
2. ``models.TYPE2FUNC`` / ``MODEL_TYPES``: registered model loaders (plugins) become
   ``--model_type`` choices for every clip_benchmark task, and ``open_clip`` resolves
   registered checkpoints such as ``crp-tiny``/``spurious_shapes``.
3. ``cli.run``: runs on group datasets go to our engine; everything else to the
   original ``run``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip_benchmark 1.6.2's top-k accuracy with ``.item()`` instead of ``float(array)``."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum().item() / n for k in topk]


@contextlib.contextmanager
def clip_benchmark_patched(loaders: dict[str, Callable], run: Callable | None = None) -> Iterator[Callable]:
    """Patch clip_benchmark for one command; yields clip_benchmark's original ``run``."""
    import clip_benchmark.cli as cb_cli
    import clip_benchmark.metrics.zeroshot_classification as cb_zs
    import clip_benchmark.models as cb_models

    saved_accuracy = cb_zs.accuracy
    saved_types = dict(cb_models.TYPE2FUNC)
    saved_names = list(cb_models.MODEL_TYPES)
    original_run = cb_cli.run
    try:
        cb_zs.accuracy = accuracy
        cb_models.TYPE2FUNC.update(loaders)
        cb_models.MODEL_TYPES[:] = list(cb_models.TYPE2FUNC)
        if run is not None:
            cb_cli.run = run
        yield original_run
    finally:
        cb_zs.accuracy = saved_accuracy
        cb_models.TYPE2FUNC.clear()
        cb_models.TYPE2FUNC.update(saved_types)
        cb_models.MODEL_TYPES[:] = saved_names
        cb_cli.run = original_run
