"""The TPT mitigation: plan the test images' views, tune a prompt per test image, predict the image.

No labels of any split are read and nothing is fitted before test (``state_dict()`` is
empty: the prompt is reset per image).  The image tower is frozen, so each test image and
its views are embedded once (one decode, through the feature cache); only the text tower
runs with gradients.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from ..base import Mitigation, RunContext
from ..seraser.config import SEraserError
from ..seraser.text_tower import PromptEncoder, model_logit_scale
from ..seraser.tuning import cpu_threads, margins, summary
from .config import NAME, TptConfig, TptError
from .tuning import TuneResult, tune_batch
from .views import views_kind


class Tpt(Mitigation):
    """Test-time prompt tuning (Shu et al. 2022) on each test image's augmented views."""

    def __init__(self, config: TptConfig | None = None):
        self.config = config or TptConfig()
        self.encoder: PromptEncoder | None = None
        self._info: dict[str, Any] = {}

    def kind(self, ctx: RunContext):
        c = self.config
        return views_kind(c.views, c.crop_scale_min, c.flip, ctx.seed)

    def feature_plan(self, ctx: RunContext, fitting: bool) -> Mapping[str, Sequence[Any]]:
        """The evaluated split's views, extracted in that split's pass (one decode per image)."""
        return {ctx.eval_split: [self.kind(ctx)]}

    def check(self, ctx: RunContext) -> None:
        """Before any extraction: the text tower can be prompt-tuned, the context fits, the scale exists."""
        self._encoder(ctx)
        self.logit_scale(ctx.model)

    def fit(self, ctx: RunContext) -> None:
        """Nothing is fitted before test (the prompt is reset per image)."""
        self._encoder(ctx)

    def _encoder(self, ctx: RunContext) -> PromptEncoder:
        if self.encoder is not None:
            return self.encoder
        c = self.config
        ctx_init = " ".join(c.ctx_init.replace("_", " ").split())
        if ctx_init and c.n_ctx is not None:
            k = int((ctx.tokenizer([ctx_init])[0] != 0).sum()) - 2  # minus SOS and EOS
            if k != c.n_ctx:
                raise TptError(f"tpt: --tpt_n_ctx {c.n_ctx} but --tpt_ctx_init {ctx_init!r} is {k} tokens; "
                               "give one of them, or an init of that many tokens")
        try:
            self.encoder = PromptEncoder(
                ctx.model, ctx.tokenizer, ctx.classnames, ctx_init=ctx_init,
                n_ctx=c.n_ctx if ctx_init or c.n_ctx is not None else 4, class_prompt=c.class_prompt,
                device=ctx.device, generator=ctx.torch_generator(f"{NAME}/ctx_init"),
            )
        except SEraserError as err:  # the shared prompt encoder names itself; say which method ran it
            raise TptError(f"tpt: {str(err).removeprefix('seraser: ')}") from err
        return self.encoder

    def logit_scale(self, model: torch.nn.Module) -> float:
        try:
            return model_logit_scale(model, self.config.logit_scale, "tpt", "--tpt_logit_scale")
        except SEraserError as err:  # raised by the shared helper; TPT's own error type
            raise TptError(str(err)) from err

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        t0 = time.perf_counter()
        encoder = self._encoder(ctx)
        image_fs = ctx.features(split)
        views_fs = ctx.features(split, self.kind(ctx))
        if views_fs.keys != image_fs.keys:
            raise TptError(f"tpt: view features of split {split!r} are not row-aligned with its image features")
        device = torch.device(ctx.device)
        image = image_fs.features.float()
        views = views_fs.features.float()
        scale = self.logit_scale(ctx.model)
        t1 = time.perf_counter()
        with cpu_threads(self.config.cpu_threads, device):
            results = self.tune(encoder, image, views, scale, device, progress=ctx.progress)
        t2 = time.perf_counter()
        logits = torch.cat([r.logits for r in results])
        untuned = torch.cat([r.untuned_logits for r in results])
        self._info = {
            "n_images": len(image),
            "n_views_with_image": int(views.shape[1]) + 1,
            "n_selected": min(self.config.n_selected, int(views.shape[1]) + 1),
            "n_ctx_used": encoder.n_ctx,
            "prompts": encoder.prompts,
            "logit_scale_used": scale,
            "view_config": self.kind(ctx).config,
            "untuned_agreement": float((logits.argmax(1) == untuned.argmax(1)).float().mean()),
            "diagnostics": {
                "marginal_entropy_before": summary(torch.cat([r.loss_first for r in results])),
                "marginal_entropy_after": summary(torch.cat([r.loss_after for r in results])),
                "image_among_kept_views": float(torch.cat([r.original_kept for r in results]).float().mean()),
                "ctx_relative_change": summary(torch.cat([r.ctx_change for r in results])),
                "untuned_margin": summary(margins(untuned)),
                "tuned_margin": summary(margins(logits)),
            },
            "seconds": {"load_features": round(t1 - t0, 3), "tuning": round(t2 - t1, 3)},
            "seconds_per_image_tuning": (t2 - t1) / max(len(image), 1),
        }
        return logits

    def tune(
        self, encoder: PromptEncoder, image: torch.Tensor, views: torch.Tensor, scale: float,
        device: torch.device | str = "cpu", progress: bool = False,
    ) -> list[TuneResult]:
        """Tune every image, ``config.batch_size`` at a time (1 = the one-image-at-a-time loop)."""
        from tqdm.auto import tqdm

        n, size = len(image), self.config.batch_size
        out = []
        with tqdm(total=n, desc=NAME, unit="img", disable=not progress, leave=False) as bar:
            for s in range(0, n, size):
                out.append(tune_batch(encoder, image[s:s + size].to(device), views[s:s + size].to(device),
                                      self.config, scale))
                bar.update(min(size, n - s))
        return out

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "method": "TPT (Shu et al., NeurIPS 2022)",
            **asdict(self.config),
            "labels_used": [],
            **self._info,
        }
