"""Model loading (a built-in plugin): open_clip, plus the checkpoints shipped in the package.

``--model crp-tiny --pretrained spurious_shapes`` resolves, offline, to the packaged
safetensors file and is loaded by open_clip's own ``create_model_and_transforms``; the
architecture config is registered with ``open_clip.add_model_config``.  Anything else
(``ViT-B-32 --pretrained openai``, ``--pretrained /path/to/file``) goes to open_clip
unchanged.  clip_benchmark's other model types are registered as they are.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from clip_benchmark.models import TYPE2FUNC

from .hookspecs import hookimpl
from .records import CheckpointSpec, ModelLoaderSpec

ASSETS = Path(__file__).parent / "assets"
#: clip_benchmark's own loaders, copied at import, before our CLI adds registered ones to its table
CLIP_BENCHMARK_LOADERS = dict(TYPE2FUNC)
TINY_MODEL = "crp-tiny"


def load_open_clip(model_name: str, pretrained: str, cache_dir: str | None = None, device: str | torch.device = "cpu"):
    """clip_benchmark's open_clip loader with registered checkpoints and configs resolved."""
    from .plugins import get_registry

    registry = get_registry()
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
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir)
    model = model.to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, transform, tokenizer


@hookimpl
def register_model_loaders(register):
    register(ModelLoaderSpec("open_clip", load_open_clip, "open_clip.create_model_and_transforms, registered checkpoints resolved"))
    for name, func in CLIP_BENCHMARK_LOADERS.items():
        if name != "open_clip":
            register(ModelLoaderSpec(name, func, f"clip_benchmark's {name} loader"))


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
