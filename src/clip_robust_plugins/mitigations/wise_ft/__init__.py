"""WiSE-FT (Wortsman et al., CVPR 2022): a zero-shot and a fine-tuned model interpolated in weight
space, alpha chosen on val: ``wise_ft`` (linear heads, :mod:`.linear`) and ``wise_ft_weights`` (the
image tower, :mod:`.weights`).  Registration only (torch-free).
Protocol, deviations and measured numbers: docs/methods/wise_ft.md.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from ...specs import MitigationSpec, Needs
from .config import CITATION, NAME, PREFIX, WEIGHTS, WiseFTConfig, WiseFTWeightsConfig


def _create(config: WiseFTConfig):
    from .linear import WiseFTLinear

    return WiseFTLinear(config)


def _create_weights(config: WiseFTWeightsConfig):
    from .weights import WiseFTWeights

    return WiseFTWeights(config)


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME,
        create=_create,
        needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"})),
        description="WiSE-FT, linear-head form: the zero-shot head interpolated with a head fine-tuned from it on "
                    "train features (cross-entropy), alpha swept 0..1 and chosen on val",
        citation=CITATION,
        options=WiseFTConfig,
        option_prefix=PREFIX,
    ))
    register(MitigationSpec(
        # its own method (not a --wise_ft_* switch): it runs the image tower (live model, a fine-tuning), the
        # linear form does not, and both can be compared in one run
        name=WEIGHTS,
        create=_create_weights,
        needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class", "group"}), feature_kinds=(),
                    live_model=True),
        description="WiSE-FT, weight-space form: the start model's image tower interpolated with one fine-tuned by "
                    "--wise_ft_finetuned (clip_ft, ravl, clip_ft_group_dro in this run, or a state file), alpha "
                    "swept 0..1 and chosen on val",
        citation=CITATION,
        options=WiseFTWeightsConfig,
        option_prefix=PREFIX,
    ))
