"""Fitted mitigation states on disk: safetensors files that name their method.

A state file holds the tensors of ``Mitigation.state_dict()`` and string metadata:
``format``, ``method``, ``model``, ``pretrained``, ``dataset``, ``classnames`` (JSON) and
``hyperparameters`` (JSON).  ``eval --mitigation_state FILE`` reads the method name from
the file, so several files can be given at once; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

STATE_FORMAT = "clip_robust_plugins.state/1"


class StateError(ValueError):
    """A state file is unreadable or does not fit this run; the message names the file."""


@dataclass(frozen=True)
class SavedState:
    path: str
    method: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def write_state(path: str, method: str, tensors: Mapping[str, torch.Tensor], provenance: Mapping[str, Any]) -> None:
    """Write one state file (callers stage it to a temporary name and rename it)."""
    from safetensors.torch import save_file

    metadata = {"format": STATE_FORMAT, "method": method}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in provenance.items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def read_state(path: str) -> SavedState:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise StateError(f"{path}: state file not found")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateError(f"{path}: not a readable safetensors state file ({exc})") from None
    if metadata.get("format") != STATE_FORMAT or "method" not in metadata:
        raise StateError(f"{path}: not a clip_robust_plugins state file (format {metadata.get('format')!r})")
    return SavedState(path, metadata["method"], tensors, metadata)


def read_states(paths: Sequence[str]) -> dict[str, SavedState]:
    """Index state files by method; two files for one method is an error."""
    states: dict[str, SavedState] = {}
    for path in paths:
        state = read_state(path)
        if state.method in states:
            raise StateError(f"{path}: a second state for method {state.method!r} (first: {states[state.method].path})")
        states[state.method] = state
    return states


def check_compatible(state: SavedState, expected: Mapping[str, Any]) -> None:
    """The state must come from the same model, checkpoint and class list as this run."""
    for key, value in expected.items():
        stored = state.metadata.get(key)
        wanted = value if isinstance(value, str) else json.dumps(value)
        if stored is not None and stored != wanted:
            raise StateError(f"{state.path}: fitted with {key}={stored}, but this run has {key}={wanted}")


def load_base_model(path: str, method: str, model_name: str | None, cache_dir: str | None, device: Any, registry: Any):
    """The base model a state file of ``method`` was fitted on: ``(state, model, transform, tokenizer)``.

    For model types that turn a state file into an open_clip-compatible model
    (``--model_type cfr|ravl|clip_ft --model BASE --pretrained STATE``): the file's metadata
    names the base model and checkpoint, loaded through the model type the fit used
    (``hyperparameters.model_type``, open_clip by default); ``--model`` must match.
    """
    state = read_state(path)
    if state.method != method:
        raise StateError(f"{path}: a state of method {state.method!r}, not {method!r}")
    base_model, base_pretrained = state.metadata.get("model"), state.metadata.get("pretrained")
    if not base_model or not base_pretrained:
        raise StateError(f"{path}: the state does not record its base model (metadata 'model'/'pretrained')")
    if model_name and model_name != base_model:
        raise StateError(
            f"{path}: {method} state fitted on --model {base_model} (pretrained {base_pretrained}), "
            f"but --model {model_name} was given"
        )
    try:
        base_type = json.loads(state.metadata.get("hyperparameters", "{}")).get("model_type") or "open_clip"
    except ValueError:
        base_type = "open_clip"
    loader = registry.model_loader(base_type).bind(registry)
    model, transform, tokenizer = loader(model_name=base_model, pretrained=base_pretrained, cache_dir=cache_dir, device=device)
    return state, model, transform, tokenizer
