"""TPT's settings: the ``--tpt_*`` flags (one frozen dataclass) and constants.

Torch-free: imported when the plugin registers.  Defaults are the paper's and the authors'
``tpt_classification.py`` (docs/methods/tpt.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ...argtypes import at_least, non_negative_float, option, positive_float
from ...errors import EvalError
from ..seraser.config import MODEL_SCALE, logit_scale_type  # the shared prompt encoder's scale flag

NAME = "tpt"
PREFIX = "tpt_"
CITATION = (
    "Shu, Nie, Huang, Yu, Goldstein, Anandkumar & Xiao, Test-Time Prompt Tuning for Zero-Shot "
    "Generalization in Vision-Language Models, NeurIPS 2022"
)
class TptError(EvalError):
    """TPT cannot run on this model or input; the message says why in one line."""


def _open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


@dataclass(frozen=True)
class TptConfig:
    """The ``--tpt_*`` flags (defaults: the paper's)."""

    views: int = option(63, "augmented views per test image; the image itself is added (64 in all)", type=at_least(1))
    selection: float = option(0.1, "fraction of the views (image included) kept: the lowest-entropy ones "
                              "(int(fraction * count), at least 1)", type=_open_fraction)
    steps: int = option(1, "AdamW steps per test image (the prompt is reset before each image)", type=at_least(0))
    lr: float = option(5e-3, "AdamW learning rate", type=positive_float)
    weight_decay: float = option(0.01, "AdamW weight decay (torch's default, as the authors)",
                                 type=non_negative_float)
    ctx_init: str = option("a photo of a", "words whose token embeddings initialise the learnable context "
                           "(empty: random init of --tpt_n_ctx vectors)")
    n_ctx: int | None = option(None, "context vectors (default: the tokens of --tpt_ctx_init, 4 if it is empty)",
                               type=at_least(1))
    class_prompt: str = option("{c}.", "the prompt after the context, {c} = class name")
    crop_scale_min: float = option(0.08, "views: smallest crop area, as a fraction of the image "
                                   "(torchvision RandomResizedCrop's scale=(min, 1))", type=_open_fraction)
    flip: bool = option(True, "views: random horizontal flip (p=0.5)")
    logit_scale: float | str = option(MODEL_SCALE, "softmax scale of the entropies and logits ('model': the "
                                      "model's own logit_scale.exp(), as the authors)", type=logit_scale_type)
    batch_size: int = option(64, "test images tuned in one batched forward, each with its own context "
                             "(1 = one image at a time)", type=at_least(1))
    cpu_threads: int = option(1, "torch threads while tuning on a CPU (0: torch's own setting)", type=at_least(0))

    def __post_init__(self) -> None:
        if self.views < 1 or self.steps < 0 or self.batch_size < 1 or self.cpu_threads < 0:
            raise ValueError("tpt: views and batch size must be >= 1, steps and cpu threads >= 0")
        if not 0.0 < self.selection <= 1.0:
            raise ValueError(f"tpt: selection must be in (0, 1], got {self.selection}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"tpt: crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"tpt: n_ctx must be at least 1, got {self.n_ctx}")
        if "{c}" not in self.class_prompt:
            raise ValueError(f"tpt: class prompt {self.class_prompt!r} has no '{{c}}'")
        if self.logit_scale != MODEL_SCALE and not (isinstance(self.logit_scale, (int, float)) and self.logit_scale > 0):
            raise ValueError(f"tpt: logit scale must be positive or 'model', got {self.logit_scale!r}")

    @property
    def n_selected(self) -> int:
        """Views kept per image: ``int(selection * (views + 1))`` as the authors' ``int(N * top)``, at least 1."""
        return max(1, int((self.views + 1) * self.selection))
