"""WiSE-FT (Wortsman et al., CVPR 2022): the zero-shot head and a fine-tuned head, interpolated in
weight space, alpha chosen on val.  Registration only (torch-free); the method is in :mod:`.linear`.
Protocol, deviations and measured numbers: docs/methods/wise_ft.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...argtypes import at_least, fraction, option, positive_float
from ...hookspecs import hookimpl
from ...records import MitigationSpec, Needs

NAME = "wise_ft"
PREFIX = "wise_ft_"
CITATION = (
    "Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi, Namkoong & Schmidt, "
    "Robust fine-tuning of zero-shot models, CVPR 2022"
)
SELECTIONS = ("worst_group", "accuracy", "fixed")
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class WiseFTConfig:
    """The ``--wise_ft_*`` flags."""

    alphas: tuple[float, ...] = option(ALPHAS, "mixing coefficients swept (0: zero-shot head, 1: fine-tuned head)",
                                       type=fraction, metavar="ALPHA")
    select: str = option("worst_group", "how alpha is chosen on val: worst_group (val group labels), accuracy "
                                        "(val class labels only) or fixed (--wise_ft_alpha, no val labels)",
                         choices=SELECTIONS)
    alpha: float = option(0.5, "alpha used with --wise_ft_select fixed (the paper's default without held-out data)",
                          type=fraction)
    epochs: int = option(10, "epochs of the head's fine-tuning on train features", type=at_least(1))
    lr: float = option(0.1, "AdamW learning rate of the head (cosine schedule; the head's weights are at logit scale 100)",
                       type=positive_float)
    weight_decay: float = option(0.0, "AdamW (decoupled) weight decay of the head", type=float)
    batch_size: int = option(256, "train features per step", type=at_least(1))


def _create(config: WiseFTConfig):
    from .linear import WiseFTLinear

    return WiseFTLinear(config)


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
