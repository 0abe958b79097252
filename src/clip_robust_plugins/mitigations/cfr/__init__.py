"""CFR (You et al., CVPR 2024): recalibrate CLIP's image projection contrastively on the
train samples a CLIP+ERM head gets wrong, keeping the zero-shot text head as classifier.

This module holds only what registration needs (the hooks; the config, whose fields are also
the ``--cfr_*`` flags, is in :mod:`.config`); the training code in :mod:`.training`, :mod:`.heads`,
:mod:`.losses`, :mod:`.sampling` and :mod:`.loader` is imported when a run uses CFR.
Protocol, deviations from the authors' code, options and measured results:
``docs/methods/cfr.md``.
"""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ...lazy import lazy_getattr
from ...specs import MitigationSpec, ModelLoaderSpec, Needs
from .config import (
    CITATION,
    ERM_SELECTIONS,
    FEATURE_KIND,
    LABEL_FREE_SELECTIONS,
    LEARNABLE_INIT,
    LOGIT_SCALE,
    NAME,
    NEGATIVE_SPACES,
    NEGATIVES,
    OPTIMIZERS,
    SELECTIONS,
    CFRConfig,
    logit_scale_arg,
)

__all__ = [
    "CITATION", "ERM_SELECTIONS", "FEATURE_KIND", "LABEL_FREE_SELECTIONS", "LEARNABLE_INIT", "LOGIT_SCALE", "NAME",
    "NEGATIVES", "NEGATIVE_SPACES", "OPTIMIZERS", "SELECTIONS", "CFRConfig", "load_cfr_model", "logit_scale_arg",
]

#: public name -> the submodule defining it, resolved on first use.  An explicit table: pluggy
#: probes plugin modules for every hook name, and a probe must not import the training code.
_NAMES: dict[str, str] = {
    **dict.fromkeys(("CRITERIA", "embed_all", "make_optimizer", "select_epoch", "CFR"), "training"),
    **dict.fromkeys(("VitProjHead", "AttnPoolHead", "ResidualAdapter", "embed_dim", "init_head", "apply_head"), "heads"),
    **dict.fromkeys(("cosine_weight", "LogitScale", "make_logit_scale", "info_nce", "supcon", "feature_dropout"),
                    "losses"),
    **dict.fromkeys(("calibration_split", "hard_negatives", "sample_positives", "authors_negatives", "AnchorCycle"),
                    "sampling"),
    "load_model": "loader",
    "curve_writer": "plot",
}


__getattr__ = lazy_getattr(__name__, _NAMES)


def load_cfr_model(model_name: str, pretrained: str, cache_dir: str | None = None, device: Any = "cpu", *,
                   registry: Any = None):
    """``--model_type cfr --model BASE --pretrained <output>_state_cfr.safetensors`` (see :mod:`.loader`)."""
    from .loader import load_model

    return load_model(model_name, pretrained, cache_dir, device, registry=registry)


def _create(config: CFRConfig):
    from .training import CFR

    return CFR(config)


@hookimpl
def register_mitigations(register):
    register(
        MitigationSpec(
            name=NAME,
            create=_create,
            # group labels: only val's, only for model selection (none with a label-free --cfr_selection)
            needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"}), feature_kinds=(FEATURE_KIND,)),
            description="CFR: recalibrate CLIP's image projection contrastively on ERM-misclassified train samples "
                        "(class labels; val group labels only for model selection)",
            citation=CITATION,
            options=CFRConfig,
            option_prefix="cfr_",
        )
    )


@hookimpl
def register_model_loaders(register):
    register(
        ModelLoaderSpec(
            NAME, load_cfr_model,
            "a base open_clip model with a fitted CFR head: --model BASE --pretrained <output>_state_cfr.safetensors",
            takes_registry=True,
        )
    )
