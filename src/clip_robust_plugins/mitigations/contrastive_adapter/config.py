"""The ``--contrastive_adapter_*`` options and the method's constants (torch-free; shared by registration and the method)."""

from __future__ import annotations

from dataclasses import dataclass

from ...argtypes import at_least, option, positive_float

NAME = "contrastive_adapter"
PREFIX = "cadapter_"
CITATION = "Zhang & Re, Contrastive Adapters for Foundation Model Group Robustness, NeurIPS 2022"


@dataclass(frozen=True)
class ContrastiveAdapterConfig:
    """The ``--cadapter_*`` flags (defaults: the recipe of the unofficial mirror's checkpoint names)."""

    hidden: int = option(128, "hidden width of the adapter MLP (d -> hidden -> d, residual)", type=at_least(1))
    epochs: int = option(100, "training epochs over train (every epoch is scored on val)", type=at_least(1))
    batch_size: int = option(128, "anchors per step", type=at_least(1))
    lr: float = option(1e-3, "SGD learning rate", type=positive_float)
    momentum: float = option(0.9, "SGD momentum", type=float)
    weight_decay: float = option(5e-5, "SGD weight decay", type=float)
    temperature: float = option(0.1, "temperature of the contrastive loss", type=positive_float)
    positives: int = option(1, "sample positives per anchor (same class, preferably another zero-shot prediction)",
                            type=at_least(0))
    negatives: int = option(16, "hard negatives per anchor: nearest neighbours (frozen embeddings) of other classes",
                            type=at_least(0))
    neighbour_pool: int = option(8192, "hard negatives are searched in a seeded pool of at most this many train "
                                       "samples (never all pairs)", type=at_least(1))
