"""Model loading (a built-in plugin): open_clip, plus the checkpoints shipped in the package.

``--model crp-tiny --pretrained spurious_shapes`` resolves, offline, to the packaged
safetensors file and is loaded by open_clip's own ``create_model_and_transforms``; the
architecture config is registered with ``open_clip.add_model_config``.  Anything else
(``ViT-B-32 --pretrained openai``, ``--pretrained /path/to/file``) goes to open_clip
unchanged.  clip_benchmark's other model types are registered by name and imported only
when used.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any

from .compat import clip_benchmark_model_types
from .errors import EvalError
from .hookspecs import hookimpl
from .specs import CheckpointSpec, ModelLoaderSpec

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL = "crp-tiny"
HF_HUB = "hf-hub:"
#: open_clip model names that name a location (the model's config comes from there, not the list)
MODEL_SCHEMAS = (HF_HUB, "local-dir:")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz")
OPEN_CLIP_LIST = "python -c 'import open_clip; print(open_clip.list_models())'"
WORLD_MODEL = "crp-world"
#: the crp-world checkpoints: tag -> how it was made
WORLD_CHECKPOINTS = {
    "clipworld": "small CLIP pretrained by scripts/train_world_clip.py on clipworld image-caption pairs",
    "clipworld_patch_ft": "clipworld fine-tuned by scripts/train_world_patch_model.py on the patch task's "
                          "correlated train split (it learned marker => circle): RaVL's biased model",
}


def load_open_clip(model_name: str, pretrained: str, cache_dir: str | None = None, device: Any = "cpu", *,
                   registry: Any = None):
    """clip_benchmark's open_clip loader with the registry's checkpoints and configs resolved."""
    import open_clip

    if registry is not None:
        for config in registry.model_config_paths(model_name):
            open_clip.add_model_config(config)
        checkpoint = registry.checkpoint(model_name, pretrained)
        if checkpoint is not None:
            if not checkpoint.path.is_file():
                raise FileNotFoundError(
                    f"checkpoint {checkpoint.name!r} registered by plugin {registry.owner('checkpoints', checkpoint.name)!r} "
                    f"points to a missing file: {checkpoint.path}"
                )
            pretrained = str(checkpoint.path)
    elif model_name in (TINY_MODEL, WORLD_MODEL) and (ASSETS / f"{model_name}_{pretrained}.safetensors").is_file():
        # without a registry (scripts, tests), the package's own shipped checkpoints still resolve
        open_clip.add_model_config(ASSETS / f"{model_name}.json")
        pretrained = str(ASSETS / f"{model_name}_{pretrained}.safetensors")
    try:
        model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir)
    except Exception as exc:
        if not os.path.isfile(pretrained):
            raise
        mismatch = first_mismatch(str(exc)) if "Error(s) in loading state_dict" in str(exc) else None
        mismatch = mismatch or _first_mismatched_key(open_clip, model_name, pretrained)
        if mismatch is None:
            raise
        raise EvalError(f"{pretrained}: does not fit --model {model_name}: {mismatch}") from exc
    model = model.to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, transform, tokenizer


_MISMATCH = re.compile(r'(Missing key\(s\)|Unexpected key\(s\)) in state_dict: "([^"]+)"|size mismatch for ([^:]+): ([^\n]*)')


def first_mismatch(message: str) -> str:
    """The first missing, unexpected or mis-shaped key of torch's ``load_state_dict`` error."""
    found = _MISMATCH.search(message)
    if found is None:
        return message.strip().splitlines()[0]
    if found.group(1):
        return f"{found.group(1).lower().replace('(s)', '')} {found.group(2)!r}"
    return f"key {found.group(3)!r}: {found.group(4).strip().rstrip('.')}"


def _first_mismatched_key(open_clip: Any, model_name: str, path: str) -> str | None:
    """The first key of a safetensors file missing from, or shaped unlike, ``model_name``'s state
    (None when all fit, or the file is not safetensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError):
        return None
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that this reference model is randomly initialised
    try:
        expected = {k: tuple(v.shape) for k, v in open_clip.create_model(model_name).state_dict().items()}
    finally:
        logging.disable(previous)
    for key, shape in shapes.items():
        if key not in expected:
            return f"unexpected key {key!r}"
        if shape != expected[key]:
            return f"key {key!r} has shape {shape} in the file, {expected[key]} in the model"
    missing = next((k for k in expected if k not in shapes), None)
    return f"missing key {missing!r}" if missing else None


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or "/" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES)


def check_open_clip(model_name: str, pretrained: str, *, registry: Any = None) -> None:
    """One line for a model name open_clip does not know or a ``--pretrained`` tag that model does
    not have (listing its real tags, registered and open_clip's, and the close match); before any
    data is read or the model built.  A file is checked when the model loads (:func:`load_open_clip`)."""
    if model_name.startswith(MODEL_SCHEMAS) or not pretrained or pretrained.startswith(HF_HUB):
        return
    if os.path.isfile(pretrained) or (registry is not None and registry.checkpoint(model_name, pretrained) is not None):
        return  # a file (checked when loaded) or a registered checkpoint: no need to import open_clip
    if _looks_like_path(pretrained):
        raise EvalError(f"--pretrained {pretrained}: no such file")
    import open_clip

    registered = sorted(c.pretrained for c in registry.checkpoints.values() if c.model == model_name) if registry else []
    if registry is not None:
        for config in registry.model_config_paths(model_name):
            open_clip.add_model_config(config)
    models = open_clip.list_models()
    if model_name not in models:
        close = difflib.get_close_matches(model_name, models, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; see {OPEN_CLIP_LIST}"
        raise EvalError(f"--model {model_name}: open_clip has no such model{hint}")
    tags = registered + sorted(set(open_clip.list_pretrained_tags_by_model(model_name)) - set(registered))
    if pretrained in registered or pretrained.lower().replace("-", "_") in tags:
        return
    close = difflib.get_close_matches(pretrained, tags, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(tags) if tags else "none (pass a checkpoint file)"
    raise EvalError(f"--pretrained {pretrained}: not a tag of --model {model_name} (its tags: {listed}){hint}")


def _clip_benchmark_loader(name: str):
    """clip_benchmark's own loader ``name``, imported on first call."""

    def load(model_name: str, pretrained: str, cache_dir: str | None = None, device: Any = "cpu"):
        from clip_benchmark.models import TYPE2FUNC

        return TYPE2FUNC[name](model_name=model_name, pretrained=pretrained, cache_dir=cache_dir, device=device)

    return load


@hookimpl
def register_model_loaders(register):
    register(ModelLoaderSpec("open_clip", load_open_clip, "open_clip.create_model_and_transforms, registered checkpoints resolved",
                             takes_registry=True, check=check_open_clip))
    for name in clip_benchmark_model_types():
        if name != "open_clip":
            register(ModelLoaderSpec(name, _clip_benchmark_loader(name), f"clip_benchmark's {name} loader"))


@hookimpl
def register_checkpoints(register):
    register(
        CheckpointSpec(
            model=TINY_MODEL,
            pretrained="spurious_shapes",
            path=ASSETS / f"{TINY_MODEL}_spurious_shapes.safetensors",
            config=ASSETS / f"{TINY_MODEL}.json",
            description="tiny CLIP trained by scripts/train_tiny_clip.py on spurious_shapes image-caption pairs",
        )
    )
    for tag, description in WORLD_CHECKPOINTS.items():
        register(CheckpointSpec(model=WORLD_MODEL, pretrained=tag, path=ASSETS / f"{WORLD_MODEL}_{tag}.safetensors",
                                config=ASSETS / f"{WORLD_MODEL}.json", description=description))
