"""The ``--wise_ft_*`` options and the method's constants (torch-free; shared by registration and the method)."""

from __future__ import annotations

from dataclasses import dataclass

from ...argtypes import at_least, fraction, option, positive_float

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
