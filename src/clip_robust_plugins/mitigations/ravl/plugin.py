"""RaVL's registrations: the ``ravl`` and ``clip_ft`` mitigations, their model types, the
region proposers, the ``region`` metric and the ``discover`` command.

Torch-free at import: every implementation module is imported inside the callables.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from ...specs import CommandSpec, MetricSpec, MitigationSpec, ModelLoaderSpec, Needs, RegionProposerSpec
from .configs import (
    BASELINE,
    CITATION,
    GROUP_DRO,
    NAME,
    PREFIX,
    BoxesOptions,
    ClipFtConfig,
    DiscoverConfig,
    GridOptions,
    GroupDroFtConfig,
    RavlConfig,
)


def _create_ravl(config: RavlConfig):
    from .finetune import RegionAwareFineTune

    return RegionAwareFineTune(NAME, config.finetune, config.discovery, config.regions)


def _create_clip_ft(config: ClipFtConfig):
    from .finetune import RegionAwareFineTune

    return RegionAwareFineTune(BASELINE, config)


def _create_clip_ft_group_dro(config: GroupDroFtConfig):
    from .finetune import RegionAwareFineTune

    return RegionAwareFineTune(GROUP_DRO, config)


def _quadrants(config: None):
    from .proposers import GridProposer

    return GridProposer(2)


def _grid(config: GridOptions):
    from .proposers import GridProposer

    return GridProposer(config.grid)


def _boxes(config: BoxesOptions):
    from .proposers import BoxesProposer

    return BoxesProposer(config.boxes_key, config.max_boxes)


def _region_metric(preds, *, ctx, mitigation):
    from .region_metrics import region_metrics

    return region_metrics(preds, ctx=ctx, mitigation=mitigation)


def _loader(method: str):
    def load(*args, **kwargs):
        from .loader import load_finetuned_model

        return load_finetuned_model(method, *args, **kwargs)

    return load


def _run_discover(config, command_ctx):
    from .command import run_discover_command

    return run_discover_command(config, command_ctx)


@hookimpl
def register_region_proposers(register):
    register(RegionProposerSpec("quadrants", _quadrants, "the four quadrants of each image (RaVL's synthetic setting)"))
    register(RegionProposerSpec("grid", _grid, "an N x N grid of equal boxes (--ravl_grid N)",
                                options=GridOptions, option_prefix=PREFIX))
    register(RegionProposerSpec("boxes", _boxes,
                                "boxes from each sample's json (--ravl_boxes_key, padded to --ravl_max_boxes)",
                                options=BoxesOptions, option_prefix=PREFIX))


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=_create_ravl, options=RavlConfig, option_prefix=PREFIX,
        # region kinds depend on --ravl_regions: feature_plan() asks for them (val: image + regions; train: regions)
        needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class"}), feature_kinds=(), live_model=True),
        description="RaVL: region-level discovery of the learned spurious feature on val (class labels only), then "
                    "region-aware fine-tuning of the image tower on train image-caption pairs",
        citation=CITATION,
    ))
    register(MitigationSpec(
        # the fine-tuning flags are ravl's (the same declarations, listed once under ravl)
        name=BASELINE, create=_create_clip_ft, options=ClipFtConfig, option_prefix=PREFIX,
        needs=Needs(fit_splits=("train",), labels=frozenset({"class"}), feature_kinds=(), live_model=True),
        description="plain fine-tuning of the image tower with the CLIP loss on train image-caption pairs "
                    "(RaVL's comparison; same --ravl_* training flags; --ravl_sampling upsample: JTT-style "
                    "upsampling of the start model's zero-shot errors)",
        citation="",
    ))
    register(MitigationSpec(
        # a method of its own because it reads train group labels (Needs are declared per method, up front)
        name=GROUP_DRO, create=_create_clip_ft_group_dro, options=GroupDroFtConfig, option_prefix=PREFIX,
        needs=Needs(fit_splits=("train",), labels=frozenset({"class", "group"}), feature_kinds=(), live_model=True),
        description="clip_ft with GroupDRO over the train group labels (oracle reference; exponentiated group "
                    "weights, --ravl_dro_eta) on the per-pair CLIP loss",
        citation="Sagawa, Koh, Hashimoto & Liang, Distributionally Robust Neural Networks for Group Shifts, ICLR 2020",
    ))


@hookimpl
def register_model_loaders(register):
    for method in (NAME, BASELINE, GROUP_DRO):
        register(ModelLoaderSpec(method, _loader(method),
                                 f"a base open_clip model with the image tower fine-tuned by {method}: "
                                 f"--model BASE --pretrained <output>_state_{method}.safetensors", takes_registry=True))


@hookimpl
def register_metrics(register):
    register(MetricSpec("region", _region_metric,
                        "zero-shot accuracy and worst-group accuracy of the labelled object region alone "
                        "(datasets with object regions in their json)", takes_context=True))


@hookimpl
def register_commands(register):
    register(CommandSpec(
        "discover", "RaVL: find the image regions a model has learned to tie spuriously to a class (no group labels)",
        _run_discover, options=DiscoverConfig, record_flags=("datasets", "region_proposers"),
        description="Region-level discovery of learned spurious correlations (RaVL) on a class-labelled split; "
                    "writes a JSON report and a PNG sheet beside it.",
    ))
