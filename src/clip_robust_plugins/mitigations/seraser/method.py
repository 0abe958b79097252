"""The SEraser mitigation: resolve the views in ``check``, plan their extraction, tune per test image.

No labels of any split are read, nothing is fitted before test (``state_dict()`` is empty:
per-image state is reset), and only the evaluated split is touched.  The image tower is
frozen, so the raw image, its views and the black image are embedded once (through the
feature cache) and only the text tower runs with gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from ...datasets.base import SampleImage
from ...specs import SampleViews
from ..base import Mitigation, RunContext
from .annotations import resolve_views
from .config import NAME, SEraserConfig, SEraserError
from .text_tower import PromptEncoder, model_logit_scale
from .tuning import TuneResult, cpu_threads, margins, summary, tune_batch
from .views import black_image_features, view_kind


class SEraser(Mitigation):
    """Test-time prompt tuning per test image on its foreground/background views."""

    def __init__(
        self,
        config: SEraserConfig | None = None,
        provider: Callable[[SampleImage], SampleViews] | None = None,
        provider_name: str | None = None,
        provider_plugin: str | None = None,
    ):
        self.config = config or SEraserConfig()
        self.provider = provider
        self.provider_name = provider_name or self.config.views
        self.provider_plugin = provider_plugin
        self.provider_reason = "given" if provider is not None else None
        self.encoder: PromptEncoder | None = None
        self._info: dict[str, Any] = {}

    def check(self, ctx: RunContext) -> None:
        """Resolve ``--seraser_views`` (``auto``: masks, else boxes, else no-segmenter views) from the
        evaluated split's annotations and the run's registry; refuse masks/boxes a split lacks."""
        if self.provider is not None:
            return
        resolved = resolve_views(self.config.views, ctx.dataset, ctx.dataset_name, ctx.eval_split)
        self.provider = ctx.view_provider(resolved.name)
        self.provider_name = resolved.name
        self.provider_plugin = ctx.registry.owner("view_providers", resolved.name)
        self.provider_reason = resolved.reason

    def feature_plan(self, ctx: RunContext, fitting: bool) -> Mapping[str, Sequence[Any]]:
        """The views of the evaluated split, extracted in that split's planned pass."""
        self.check(ctx)
        return {ctx.eval_split: [view_kind(self.provider, self.provider_name)]}

    def fit(self, ctx: RunContext) -> None:
        """Nothing is fitted before test; this checks the text tower and builds the prompts early."""
        self.check(ctx)
        self._encoder(ctx)

    def _encoder(self, ctx: RunContext) -> PromptEncoder:
        if self.encoder is None:
            c = self.config
            self.encoder = PromptEncoder(
                ctx.model, ctx.tokenizer, ctx.classnames, ctx_init=c.ctx_init, n_ctx=c.n_ctx,
                class_prompt=c.class_prompt, device=ctx.device, generator=ctx.torch_generator(f"{NAME}/ctx_init"),
            )
        return self.encoder

    def logit_scale(self, model: torch.nn.Module) -> float:
        return model_logit_scale(model, self.config.logit_scale, "seraser", "--seraser_logit_scale")

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        self.check(ctx)
        t0 = time.perf_counter()
        encoder = self._encoder(ctx)
        kind = view_kind(self.provider, self.provider_name)
        raw_fs = ctx.features(split)
        views_fs = ctx.features(split, kind)
        if views_fs.keys != raw_fs.keys:
            raise SEraserError(f"seraser: view features of split {split!r} are not row-aligned with its image features")
        n_fg = kind.derive.n_foreground
        device = torch.device(ctx.device)
        raw = raw_fs.features.float()
        views = views_fs.features.float()
        black = black_image_features(ctx.model, ctx.transform, ctx.device, ctx.amp).cpu() if self.config.black_view else None
        t1 = time.perf_counter()
        scale = self.logit_scale(ctx.model)
        with cpu_threads(self.config.cpu_threads, device):
            results = self.tune(
                encoder, raw, views[:, :n_fg], views[:, n_fg:], black, scale, device, progress=ctx.progress
            )
        t2 = time.perf_counter()
        logits = torch.cat([r.logits for r in results])
        untuned = torch.cat([r.untuned_logits for r in results])
        self._info = {
            "n_foreground_views": n_fg,
            "n_background_views": int(views.shape[1] - n_fg) + (1 if black is not None else 0),
            "logit_scale_used": scale,
            "n_ctx_used": encoder.n_ctx,
            "prompts": encoder.prompts,
            "n_images": len(raw),
            "untuned_agreement": float((logits.argmax(1) == untuned.argmax(1)).float().mean()),
            "loss_first_step_mean": float(torch.cat([r.loss_first for r in results]).mean()),
            "loss_last_step_mean": float(torch.cat([r.loss_last for r in results]).mean()),
            "diagnostics": {
                "ctx_relative_change": summary(torch.cat([r.ctx_change for r in results])),
                "text_cosine_tuned_vs_untuned_min_over_classes": summary(torch.cat([r.text_cosine for r in results])),
                "untuned_margin": summary(margins(untuned)),
                "tuned_margin": summary(margins(logits)),
            },
            "seconds": {"views_and_black_image": round(t1 - t0, 3), "tuning": round(t2 - t1, 3)},
            "seconds_per_image_tuning": (t2 - t1) / max(len(raw), 1),
        }
        return logits

    def tune(
        self,
        encoder: PromptEncoder,
        raw: torch.Tensor,
        foreground: torch.Tensor,
        background: torch.Tensor,
        black: torch.Tensor | None,
        scale: float,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> list[TuneResult]:
        """Tune every image, ``config.batch_size`` at a time (1 = the one-image-at-a-time loop)."""
        from tqdm.auto import tqdm

        n = len(raw)
        size = self.config.batch_size
        out = []
        with tqdm(total=n, desc=NAME, unit="img", disable=not progress, leave=False) as bar:
            for s in range(0, n, size):
                bg = background[s:s + size]
                if black is not None:
                    bg = torch.cat([bg, black.view(1, 1, -1).expand(len(bg), 1, -1)], dim=1)
                out.append(
                    tune_batch(
                        encoder, raw[s:s + size].to(device), foreground[s:s + size].to(device), bg.to(device),
                        self.config, scale,
                    )
                )
                bar.update(min(size, n - s))
        return out

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "method": "SEraser (Ma et al., arXiv 2403.00376)",
            # the views' settings are in view_provider_config (the built-ins' nested settings, when they apply)
            **{k: v for k, v in asdict(self.config).items() if k != "view_settings"},
            "view_provider": self.provider_name,
            "view_provider_reason": self.provider_reason,
            "view_provider_plugin": self.provider_plugin,
            "view_provider_config": getattr(self.provider, "config", None),
            "labels_used": [],
            **self._info,
        }
