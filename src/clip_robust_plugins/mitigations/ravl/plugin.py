"""RaVL's registrations: the ``ravl`` and ``clip_ft`` mitigations, their model types, the
region proposers, the ``region`` metric and the ``discover`` command.

Torch-free at import: every implementation module is imported inside the callables.
"""

from __future__ import annotations

import argparse

from ...argtypes import add_config_flags
from ...hookspecs import hookimpl
from ...records import CommandSpec, MetricSpec, MitigationSpec, ModelLoaderSpec, Needs, RegionProposerSpec
from .configs import (
    BASELINE,
    CITATION,
    NAME,
    PREFIX,
    DiscoveryConfig,
    FineTuneConfig,
    RegionConfig,
    discovery_config,
    finetune_config,
    region_config,
)


def _create(method: str):
    def create(options: argparse.Namespace):
        from .finetune import RegionAwareFineTune

        return RegionAwareFineTune(method, finetune_config(options),
                                   discovery_config(options) if method == NAME else None, options,
                                   model_type=getattr(options, "model_type", None) or "open_clip")

    return create


def _grid(n_from_options):
    def create(options: argparse.Namespace):
        from .proposers import GridProposer

        return GridProposer(n_from_options(options))

    return create


def _boxes(options: argparse.Namespace):
    from .proposers import BoxesProposer

    cfg = region_config(options)
    return BoxesProposer(cfg.boxes_key, cfg.max_boxes)


def _region_metric(preds, *, ctx, mitigation):
    from .region_metrics import region_metrics

    return region_metrics(preds, ctx=ctx, mitigation=mitigation)


def _loader(method: str):
    def load(*args, **kwargs):
        from .loader import load_finetuned_model

        return load_finetuned_model(method, *args, **kwargs)

    return load


def _add_discover_arguments(parser, command_ctx) -> None:
    from .command import add_discover_arguments

    add_discover_arguments(parser, command_ctx)


def _run_discover(args, command_ctx):
    from .command import run_discover_command

    return run_discover_command(args, command_ctx)


@hookimpl
def add_arguments(parser):
    add_config_flags(parser, RegionConfig, PREFIX, "ravl/discover")
    add_config_flags(parser, DiscoveryConfig, PREFIX, "ravl/discover")
    add_config_flags(parser, FineTuneConfig, PREFIX, "ravl")


@hookimpl
def register_region_proposers(register):
    register(RegionProposerSpec("quadrants", _grid(lambda options: 2),
                                "the four quadrants of each image (RaVL's synthetic setting)"))
    register(RegionProposerSpec("grid", _grid(lambda options: region_config(options).grid),
                                "an N x N grid of equal boxes (--ravl_grid N)"))
    register(RegionProposerSpec("boxes", _boxes,
                                "boxes from each sample's json (--ravl_boxes_key, padded to --ravl_max_boxes)"))


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=_create(NAME),
        # region kinds depend on --ravl_regions: feature_plan() asks for them (val: image + regions; train: regions)
        needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class"}), feature_kinds=(), live_model=True),
        description="RaVL: region-level discovery of the learned spurious feature on val (class labels only), then "
                    "region-aware fine-tuning of the image tower on train image-caption pairs",
        citation=CITATION,
    ))
    register(MitigationSpec(
        name=BASELINE, create=_create(BASELINE),
        needs=Needs(fit_splits=("train",), labels=frozenset({"class"}), feature_kinds=(), live_model=True),
        description="plain fine-tuning of the image tower with the CLIP loss on train image-caption pairs "
                    "(RaVL's comparison; same --ravl_* training flags)",
        citation="",
    ))


@hookimpl
def register_model_loaders(register):
    for method in (NAME, BASELINE):
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
        _add_discover_arguments, _run_discover,
        description="Region-level discovery of learned spurious correlations (RaVL) on a class-labelled split; "
                    "writes a JSON report and a PNG sheet beside it.",
    ))
