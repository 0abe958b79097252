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

import argparse
import ast
import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any


def _module_source(module: str) -> ast.Module | None:
    """The parsed source of an installed module, without importing it or its package (None if
    unavailable): ``find_spec`` of a submodule would import the parent package."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if rest:
        folders = list(spec.submodule_search_locations or ())
        candidates = [os.path.join(folder, *rest[:-1], rest[-1] + ".py") for folder in folders]
        candidates += [os.path.join(folder, *rest, "__init__.py") for folder in folders]
        origin = next((c for c in candidates if os.path.isfile(c)), None)
    else:
        origin = spec.origin
    if not origin or not os.path.isfile(origin):
        return None
    with open(origin, encoding="utf-8") as fh:
        return ast.parse(fh.read(), origin)


@functools.cache
def clip_benchmark_model_types() -> tuple[str, ...]:
    """clip_benchmark's ``--model_type`` names, read from its ``TYPE2FUNC`` literal without
    importing clip_benchmark (which imports torch and open_clip); falls back to the import."""
    tree = _module_source("clip_benchmark.models")
    for node in tree.body if tree is not None else ():
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TYPE2FUNC" for t in node.targets):
            if isinstance(node.value, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.value.keys):
                return tuple(k.value for k in node.value.keys)
    from clip_benchmark.models import MODEL_TYPES

    return tuple(MODEL_TYPES)


def clip_benchmark_parser(model_types: list[str]) -> argparse.ArgumentParser:
    """clip_benchmark's own ``eval``/``build`` parser, built from the source of its
    ``get_parser_args`` with only argparse in scope (so ``--help`` does not import torch,
    open_clip and every dataset module).  ``model_types`` are the ``--model_type`` choices.
    If clip_benchmark's function ever needs more than that, it is imported and called."""
    tree = _module_source("clip_benchmark.cli")
    func = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_parser_args"), None) if tree else None
    saved = sys.argv
    sys.argv = ["clip_benchmark", "build", os.devnull]  # the builder parses sys.argv: give it a valid one
    try:
        if func is not None:
            namespace: dict[str, Any] = {"argparse": argparse, "MODEL_TYPES": model_types}
            try:
                exec(compile(ast.Module(body=[func], type_ignores=[]), "<clip_benchmark.cli>", "exec"), namespace)
                return namespace["get_parser_args"]()[0]
            except NameError:
                pass
        import clip_benchmark.cli as cb_cli

        return cb_cli.get_parser_args()[0]
    finally:
        sys.argv = saved


def accuracy(output, target, topk=(1,)) -> list[float]:
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
