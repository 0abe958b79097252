"""Model loading (a built-in plugin): open_clip, plus the checkpoints shipped in the package.

``--model crp-tiny --pretrained spurious_shapes`` resolves, offline, to the packaged
safetensors file and is loaded by open_clip's own ``create_model_and_transforms``; the
architecture config is registered with ``open_clip.add_model_config``.  Anything else
(``ViT-B-32 --pretrained openai``, ``--pretrained /path/to/file``) goes to open_clip
unchanged.  clip_benchmark's other model types are registered by name and imported only
when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .compat import clip_benchmark_model_types
from .hookspecs import hookimpl
from .records import CheckpointSpec, ModelLoaderSpec

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL = "crp-tiny"
WORLD_MODEL = "crp-world"
#: the crp-world checkpoints: tag -> how it was made
WORLD_CHECKPOINTS = {
    "clipworld": "small CLIP pretrained by scripts/train_world_clip.py on clipworld image-caption pairs",
    "clipworld_patch_ft": "crp-world/clipworld fine-tuned by scripts/train_world_patch_model.py on the robust/clipworld "
                          "patch task; it has learned 'cyan patch => star'",
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
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir)
    model = model.to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, transform, tokenizer


def _clip_benchmark_loader(name: str):
    """clip_benchmark's own loader ``name``, imported on first call."""

    def load(model_name: str, pretrained: str, cache_dir: str | None = None, device: Any = "cpu"):
        from clip_benchmark.models import TYPE2FUNC

        return TYPE2FUNC[name](model_name=model_name, pretrained=pretrained, cache_dir=cache_dir, device=device)

    return load


@hookimpl
def register_model_loaders(register):
    register(ModelLoaderSpec("open_clip", load_open_clip, "open_clip.create_model_and_transforms, registered checkpoints resolved",
                             takes_registry=True))
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
