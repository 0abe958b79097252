"""CFR's settings: the config dataclass whose ``option`` fields are the ``--cfr_*`` flags (torch-free)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ...argtypes import at_least, fraction, option, positive_float

NAME = "cfr"
FEATURE_KIND = "preproj"
#: clip_benchmark's logit scale (``100. * image_features @ classifier``)
LOGIT_SCALE = 100.0
#: the authors' learnable logit scale starts at ``exp(log(1 / 0.07))``
LEARNABLE_INIT = 1 / 0.07
SELECTIONS = ("worst_group", "class_balanced", "val_ce")
NEGATIVE_SPACES = ("preproj", "erm")
NEGATIVES = ("hard", "authors")
OPTIMIZERS = ("adamw", "sgd")
ERM_SELECTIONS = ("last", "best")
CITATION = (
    "You, Min, Dai, Sekhon, Staib & Duncan, Calibrating Multi-modal Representations: "
    "A Pursuit of Group Robustness without Annotations, CVPR 2024"
)
#: selection criteria that read no group label (``labels_used`` is then only ``class``)
LABEL_FREE_SELECTIONS = ("class_balanced", "val_ce")


def logit_scale_arg(text: str) -> str:
    """``--cfr_logit_scale``: a positive number, ``model`` or ``learnable``."""
    if text in ("model", "learnable"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, 'model' or 'learnable', got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, 'model' or 'learnable', got {text!r}")
    return f"{value:g}"


@dataclass(frozen=True)
class CFRConfig:
    """Settings of one CFR fit; each ``option`` field is also the flag ``--cfr_<field>``.

    Defaults were chosen on the val split of ``robust/spurious_shapes`` (docs/methods/cfr.md);
    the authors' settings are available as options.
    """

    epochs: int = option(30, "contrastive recalibration epochs, one val check each (authors: 100)", type=at_least(1))
    erm_epochs: int = option(20, "CLIP+ERM epochs that build the calibration set", type=at_least(0))
    erm_selection: str = option(
        "best", "CLIP+ERM checkpoint: best epoch by the --cfr_selection criterion on val (the authors'), or the last",
        choices=ERM_SELECTIONS)
    optimizer: str = option("adamw", "optimizer of both stages: adamw, or sgd with momentum 0.9 (the authors' base code)",
                            choices=OPTIMIZERS)
    lr: float = option(1e-4, "learning rate, both stages", type=positive_float)
    weight_decay: float = option(1e-5, "weight decay, both stages", type=float)
    batch_size: int = option(128, "train samples (and calibration anchors) per step", type=at_least(2))
    logit_scale: str = option(
        "100", "logit scale of the training losses: a number (100: clip_benchmark's), model (the model's own "
        "exp(logit_scale)) or learnable (a trained scale initialised at 1/0.07, the authors')", type=logit_scale_arg)
    negatives: str = option(
        "hard", "InfoNCE negatives: hard (the most similar train samples of other classes, the paper's) or authors "
        "(random train samples of the anchor's own class, what the authors' loader ends with)", choices=NEGATIVES)
    feature_dropout: float = option(0.0, "dropout on the head's input features while training (authors: 0.1)",
                                    type=fraction)
    selection: str = option(
        "worst_group", "per-epoch checkpoint selection on val: worst_group (val group labels, the paper's), "
        "class_balanced (mean per-class recall) or val_ce (val cross-entropy); the last two read no group label",
        choices=SELECTIONS)
    negative_space: str = option(
        "preproj", "space in which hard negatives are the most similar other-class samples: the frozen "
        "pre-projection features (the authors') or the CLIP+ERM embeddings", choices=NEGATIVE_SPACES)
    n_positives: int = option(16, "positives per anchor", type=at_least(1))
    n_negatives: int = option(16, "negatives per anchor", type=at_least(1))
    tau: float = option(1.0, "InfoNCE temperature on cosine similarities (the authors')", type=positive_float)
    supcon_tau: float = option(0.07, "supervised contrastive temperature", type=positive_float)
    # diagnostics (no flag): loss-term weights and calibration anchors per step (None: batch_size, the authors')
    ce_weight: float = 1.0
    nce_weight: float = 1.0
    supcon_weight: float = 1.0
    anchors_per_step: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("selection", SELECTIONS), ("negative_space", NEGATIVE_SPACES), ("negatives", NEGATIVES),
                              ("optimizer", OPTIMIZERS), ("erm_selection", ERM_SELECTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"cfr: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "n_positives", "n_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"cfr: {name} must be at least 1, got {getattr(self, name)}")
        if self.erm_epochs < 0:
            raise ValueError(f"cfr: erm_epochs must be >= 0, got {self.erm_epochs}")
        if self.tau <= 0 or self.supcon_tau <= 0:
            raise ValueError("cfr: temperatures must be positive")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"cfr: feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if self.anchors_per_step is not None and self.anchors_per_step < 1:
            raise ValueError(f"cfr: anchors_per_step must be at least 1, got {self.anchors_per_step}")
        try:
            logit_scale_arg(str(self.logit_scale))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"cfr: logit_scale {exc}") from None

    @property
    def uses_group_labels(self) -> bool:
        return self.selection not in LABEL_FREE_SELECTIONS
