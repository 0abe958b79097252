"""The ``--wise_ft_*`` options and the methods' constants (torch-free; shared by registration and the methods)."""

from __future__ import annotations

from dataclasses import dataclass

from ...argtypes import at_least, fraction, option, positive_float

NAME = "wise_ft"
#: the weight-space form over the image tower (a method of its own: it fine-tunes or loads a tower)
WEIGHTS = "wise_ft_weights"
PREFIX = "wise_ft_"
CITATION = (
    "Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi, Namkoong & Schmidt, "
    "Robust fine-tuning of zero-shot models, CVPR 2022"
)
SELECTIONS = ("worst_group", "accuracy", "entropy", "fixed")
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
#: the fine-tuned ends wise_ft_weights can fit in the run (RaVL's package registers them)
FINETUNED_METHODS = ("clip_ft", "ravl", "clip_ft_group_dro")


@dataclass(frozen=True)
class WiseFTSelection:
    """How alpha is swept and chosen (both forms share these flags)."""

    alphas: tuple[float, ...] = option(ALPHAS, "mixing coefficients swept (0: zero-shot end, 1: fine-tuned end)",
                                       type=fraction, metavar="ALPHA")
    select: str = option("worst_group", "how alpha is chosen on val: worst_group (val group labels), accuracy "
                                        "(val class labels only), entropy (lowest mean normalised prediction "
                                        "entropy on val; no labels) or fixed (--wise_ft_alpha, no val labels)",
                         choices=SELECTIONS)
    alpha: float = option(0.5, "alpha used with --wise_ft_select fixed (the paper's default without held-out data)",
                          type=fraction)


@dataclass(frozen=True)
class WiseFTConfig(WiseFTSelection):
    """The linear-head form's flags."""

    epochs: int = option(10, "epochs of the head's fine-tuning on train features", type=at_least(1))
    lr: float = option(0.1, "AdamW learning rate of the head (cosine schedule; the head's weights are at logit scale 100)",
                       type=positive_float)
    weight_decay: float = option(0.0, "AdamW (decoupled) weight decay of the head", type=float)
    batch_size: int = option(256, "train features per step", type=at_least(1))


@dataclass(frozen=True)
class WiseFTWeightsConfig(WiseFTSelection):
    """The weight-space form's flags (the fine-tuning itself takes the ``--ravl_*`` flags)."""

    finetuned: str = option("clip_ft", "wise_ft_weights: the fine-tuned end, a method fitted in this run with the "
                                       "--ravl_* flags (clip_ft, ravl, clip_ft_group_dro) or a state file of one "
                                       "(--save_mitigation_state)", metavar="METHOD|STATE")
