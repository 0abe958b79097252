"""SEraser: test-time prompt tuning that erases spurious features (Ma et al., arXiv 2403.00376).

This module registers the method and its view providers; it holds only the hooks (the
config dataclasses are in :mod:`.config`), so registering imports no torch.  The
implementation, imported on first use, lives in :mod:`.views` (foreground/background views), :mod:`.annotations` (which views a split can
give, decided before any extraction), :mod:`.text_tower` (prompt features),
:mod:`.tuning` (the batched per-image tuning) and :mod:`.method` (the mitigation).
Protocol, deviations, costs and results: ``docs/methods/seraser.md``.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from ...lazy import lazy_getattr
from ...specs import MitigationSpec, Needs, ViewProviderSpec
from .config import (  # noqa: F401 - re-exported
    AUTO,
    AUTO_FALLBACK,
    BUILTIN_VIEWS,
    CITATION,
    NAME,
    SEraserConfig,
    SEraserError,
    ViewOptions,
)


def _provider(name: str):
    def create(config: ViewOptions, seed: int):
        from . import views

        return views.make_provider(name, config, seed)

    return create


def _create(config: SEraserConfig):
    from .method import SEraser

    return SEraser(config)


def _view_provider(name: str, description: str) -> ViewProviderSpec:
    # the flags are SEraserConfig's nested view settings (the same declarations: listed once, under seraser)
    return ViewProviderSpec(name, _provider(name), description, options=ViewOptions, option_prefix="seraser_",
                            takes_seed=True)


@hookimpl
def register_view_providers(register):
    register(_view_provider(
        "masks", "the dataset's foreground masks: object on a neutral fill / background with the object filled",
    ))
    register(_view_provider("boxes", "the dataset's object boxes used as masks (the authors' box variant)"))
    register(_view_provider(
        "augment", "no segmenter: the raw image as foreground, it and geometric+cutout augmentations of it as "
        "background (the authors' no-SAM augmentation, 4 views)",
    ))
    register(_view_provider(
        "authors",
        "no segmenter: the raw image as foreground, it and 15 torchvision RandAugment(num_ops=2) views as background",
    ))


@hookimpl
def register_mitigations(register):
    register(
        MitigationSpec(
            name=NAME,
            create=_create,
            needs=Needs(fit_splits=(), labels=frozenset(), feature_kinds=("image",), live_model=True),
            description="SEraser: per-test-image prompt tuning that pushes background views to uniform and keeps "
                        "foreground views confident (no labels; views from --seraser_views, default auto)",
            citation=CITATION,
            # the paper's 20 steps at lr 5e-4 leave the tiny model's predictions unchanged; this
            # schedule was chosen on spurious_shapes' val split (docs/methods/seraser.md)
            demo_flags=("--seraser_lr", "1e-2", "--seraser_steps", "100"),
            options=SEraserConfig,
            option_prefix="seraser_",
        )
    )


#: implementation names re-exported lazily (importing them imports torch)
_LAZY = {
    "SEraser": "method",
    "PromptEncoder": "text_tower", "TextTower": "text_tower", "text_tower": "text_tower",
    "TuneResult": "tuning", "tune_batch": "tuning", "background_loss": "tuning", "entropy_loss": "tuning",
    "kl_to_reference": "tuning", "cpu_threads": "tuning",
    "MaskViews": "views", "AugmentViews": "views", "AuthorsViews": "views", "ProviderImages": "views",
    "provider_counts": "views", "view_kind": "views", "strong_augment": "views", "sample_rng": "views",
    "black_image_features": "views", "make_provider": "views",
    "split_annotations": "annotations", "resolve_views": "annotations",
}


__getattr__ = lazy_getattr(__name__, _LAZY)
