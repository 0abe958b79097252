"""SEraser's settings: the config dataclasses (each field also a ``--seraser_*`` flag) and constants.

Torch-free: imported when the plugin registers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...argtypes import at_least, nested, non_negative_float, option, positive_float
from ...errors import EvalError

NAME = "seraser"
CITATION = (
    "Ma, Zhu, Zhang, Zhao, Wu, Huang, Hu & Wu, Spurious Feature Eraser: Stabilizing Test-Time Adaptation "
    "for Vision-Language Foundation Model, arXiv 2403.00376 (2024)"
)
FG_LOSSES = ("entropy", "kl")
FG_FILLS = ("gray", "black")
BG_FILLS = ("mean", "gray", "black")
#: ``--seraser_views auto``: the dataset's masks, else its boxes, else :data:`AUTO_FALLBACK`
AUTO = "auto"
AUTO_FALLBACK = "augment"
#: the built-in providers, in the order ``auto`` prefers them
BUILTIN_VIEWS = ("masks", "boxes", "augment", "authors")
#: default augmentations added to the background views, per built-in provider: none for
#: masks/boxes (the authors' default path), 4 for ``augment``, 15 for ``authors`` (their
#: ``RAW_AUG_NUM`` 16 minus the un-augmented view)
DEFAULT_N_AUG = {"masks": 0, "boxes": 0, "augment": 4, "authors": 15}
MODEL_SCALE = "model"


class SEraserError(EvalError):
    """SEraser cannot run on this model or input; the message says why in one line."""


def logit_scale_type(text: str) -> float | str:
    """``--*_logit_scale``: a positive float, or ``model`` (the model's own ``logit_scale.exp()``)."""
    return MODEL_SCALE if text == MODEL_SCALE else positive_float(text)


@dataclass(frozen=True)
class ViewOptions:
    """Settings of the built-in view providers (``--seraser_n_aug`` etc.); the run's ``--seed``
    is handed to the providers separately."""

    n_aug: int | None = option(None, "augmentations added to the background views (default per provider: "
                               "0 masks/boxes, 4 augment, 15 authors)", type=at_least(0))
    n_fg_aug: int = option(0, "augmentations added to the foreground views", type=at_least(0))
    fg_fill: str = option("black", "masks/boxes: fill around the object in foreground views", choices=FG_FILLS)
    bg_fill: str = option("mean", "masks/boxes: fill of the object in background views (mean: the mean colour "
                          "of the image's background pixels)", choices=BG_FILLS)
    randaugment_ops: int = option(2, "authors views: torchvision RandAugment num_ops", type=at_least(1))
    randaugment_magnitude: int = option(9, "authors views: torchvision RandAugment magnitude (0-30)",
                                        type=at_least(0))

    def __post_init__(self) -> None:
        if (self.n_aug is not None and self.n_aug < 0) or self.n_fg_aug < 0:
            raise ValueError("seraser: augmentation counts must be >= 0")
        if self.fg_fill not in FG_FILLS:
            raise ValueError(f"seraser: foreground fill must be one of {FG_FILLS}, got {self.fg_fill!r}")
        if self.bg_fill not in BG_FILLS:
            raise ValueError(f"seraser: background fill must be one of {BG_FILLS}, got {self.bg_fill!r}")
        if not 0 <= self.randaugment_magnitude <= 30 or self.randaugment_ops < 1:
            raise ValueError("seraser: RandAugment needs num_ops >= 1 and a magnitude in 0..30")

    def n_aug_for(self, provider: str) -> int:
        return DEFAULT_N_AUG[provider] if self.n_aug is None else self.n_aug


@dataclass(frozen=True)
class SEraserConfig:
    """Settings of the test-time tuning (defaults: the paper's; ``docs/methods/seraser.md``)."""

    views: str = option(AUTO, "view provider: auto (the dataset's masks, else boxes, else augment), masks, boxes, "
                        "augment, authors, or a plugin's", metavar="NAME")
    ctx_init: str = option("a photo of", "words whose token embeddings initialise the context "
                           "(empty: random init of --seraser_n_ctx vectors)")
    n_ctx: int | None = option(None, "context vectors (default: the tokens of --seraser_ctx_init, 3 if it is empty)",
                               type=at_least(1))
    class_prompt: str = option("a {c}.", "the prompt after the context, {c} = class name")
    steps: int = option(20, "AdamW steps per test image", type=at_least(0))
    lr: float = option(5e-4, "learning rate", type=positive_float)
    weight_decay: float = option(0.01, "AdamW weight decay (torch's default, as the authors)",
                                 type=non_negative_float)
    fg_loss: str = option("entropy", "foreground term: entropy of the prediction, or KL to the untuned prompt's",
                          choices=FG_LOSSES)
    bg_weight: float = option(1.0, "weight of the background KL-to-uniform term", type=non_negative_float)
    fg_weight: float = option(1.0, "weight of the foreground term", type=non_negative_float)
    batch_size: int = option(256, "test images tuned in one batched forward, each with its own context "
                             "(1 = one image at a time)", type=at_least(1))
    logit_scale: float | str = option(100.0, "softmax scale of the losses and logits ('model': the model's own "
                                      "logit_scale.exp())", type=logit_scale_type)
    black_view: bool = option(True, "add the all-black image to the background views")
    cpu_threads: int = option(1, "torch threads while tuning on a CPU (0: torch's own setting)", type=at_least(0))
    #: the built-in view providers' settings (their flags are listed with SEraser's; a provider
    #: is made with them through its own registration, see ``ViewProviderSpec.options``)
    view_settings: ViewOptions = nested(ViewOptions)

    def __post_init__(self) -> None:
        if self.fg_loss not in FG_LOSSES:
            raise ValueError(f"seraser: fg loss must be one of {FG_LOSSES}, got {self.fg_loss!r}")
        if self.steps < 0 or self.batch_size < 1 or self.cpu_threads < 0:
            raise ValueError("seraser: steps and cpu threads must be >= 0 and batch size >= 1")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"seraser: n_ctx must be at least 1, got {self.n_ctx}")
        if "{c}" not in self.class_prompt:
            raise ValueError(f"seraser: class prompt {self.class_prompt!r} has no '{{c}}'")
        if self.logit_scale != MODEL_SCALE and not (isinstance(self.logit_scale, (int, float)) and self.logit_scale > 0):
            raise ValueError(f"seraser: logit scale must be positive or 'model', got {self.logit_scale!r}")
