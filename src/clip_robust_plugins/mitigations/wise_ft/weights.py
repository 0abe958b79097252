"""WiSE-FT, weight-space form: the image tower of the fine-tuning's start model and a fine-tuned one
(``clip_ft``/``ravl``/``clip_ft_group_dro``, fitted in the run or loaded from its state file),
interpolated parameter by parameter, alpha chosen on val (docs/methods/wise_ft.md)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...datasets.base import DatasetError
from ...features import FeatureExtractor
from ...states import StateError, read_state
from ..base import Mitigation, RunContext
from ..ravl import data_parallel
from ..ravl.loader import apply_state, load_init_model, split_state
from ..ravl.training import logits_with_head, own_zeroshot_head
from .config import FINETUNED_METHODS, WEIGHTS, WiseFTWeightsConfig
from .selection import choose_alpha, curve_row, curve_writer


def interpolate_state(zero: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) theta_0 + alpha theta_1`` for every floating-point tensor (others, e.g. integer
    buffers, must agree and are taken from ``theta_1``); the two must have the same keys and shapes."""
    if set(zero) != set(tuned):
        raise StateError(f"{WEIGHTS}: the two image towers have different parameters "
                         f"(first: {sorted(set(zero) ^ set(tuned))[0]})")
    out = {}
    for k, t1 in tuned.items():
        t0 = zero[k]
        if t0.shape != t1.shape:
            raise StateError(f"{WEIGHTS}: parameter {k!r} has shape {tuple(t0.shape)} vs {tuple(t1.shape)}")
        if t1.is_floating_point():
            out[k] = (1 - alpha) * t0.float() + alpha * t1.float()
        else:
            out[k] = t1.clone()
    return out


def state_digest(*states: Mapping[str, torch.Tensor]) -> str:
    """A content hash of tensors (the feature-cache key of an interpolated model)."""
    h = hashlib.sha256()
    for state in states:
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:24]


class WiseFTWeights(Mitigation):
    """The weight-space WiSE-FT over the image tower (see docs/methods/wise_ft.md)."""

    def __init__(self, config: WiseFTWeightsConfig):
        self.config = config
        self.from_file = config.finetuned not in FINETUNED_METHODS
        #: an in-run fine-tuning takes part in torchrun like clip_ft does (the sweep is rank 0's)
        self.data_parallel = not self.from_file
        self.inner: Mitigation | None = None
        self.visual_state: dict[str, torch.Tensor] | None = None
        self.base_state: dict[str, torch.Tensor] = {}
        self.alpha: float | None = None
        self._model: torch.nn.Module | None = None
        self._head: torch.Tensor | None = None
        self._info: dict[str, Any] = {}

    # ---- before any work

    def check(self, ctx: RunContext) -> None:
        if "val" not in ctx.dataset.splits():
            raise ValueError(f"{WEIGHTS}: dataset {ctx.dataset_name!r} has no 'val' split")
        if self.from_file:
            if not os.path.isfile(self.config.finetuned):
                raise ValueError(f"--wise_ft_finetuned {self.config.finetuned}: neither one of "
                                 f"{', '.join(FINETUNED_METHODS)} nor an existing state file")
            state = read_state(self.config.finetuned)
            if state.method not in FINETUNED_METHODS:
                raise StateError(f"{state.path}: a state of method {state.method!r}, not of "
                                 f"{'/'.join(FINETUNED_METHODS)}")
            split_state(state.tensors)  # not an image tower: a StateError now
            return
        spec = ctx.registry.mitigation(self.config.finetuned)
        self.inner = spec.create(ctx.config(spec))
        self.inner.check(ctx)

    def feature_plan(self, ctx: RunContext, fitting: bool) -> Mapping[str, Any]:
        plan: dict[str, list] = {"val": ["image"]} if fitting else {}
        if fitting and self.inner is not None:
            for split, kinds in self.inner.feature_plan(ctx, fitting).items():
                plan.setdefault(split, []).extend(kinds)
        return plan

    # ---- fit

    def _ends(self, ctx: RunContext) -> tuple[dict, dict, dict, str | None, dict] | None:
        """(theta_0, theta_1, the start's other parameters, start checkpoint, provenance of theta_1);
        None on a torchrun worker rank, whose part ends with the fine-tuning."""
        if self.inner is not None:
            self.inner.fit(ctx)
            dp = data_parallel.current()
            if dp is not None and not dp.is_main:
                return None
            tuned, base = self.inner.visual_state, self.inner.base_state
            init, source = self.inner.config.init, {"fitted_in_run": self.config.finetuned,
                                                    "fit": self.inner.hyperparameters()}
        else:
            state = read_state(self.config.finetuned)
            tuned, base = split_state(state.tensors)
            hp = json.loads(state.metadata.get("hyperparameters", "{}") or "{}")
            init = hp.get("init")
            if init is None and (state.metadata.get("model"), state.metadata.get("pretrained")) != \
                    (ctx.model_name, ctx.pretrained):
                raise StateError(f"{state.path}: fitted from --model {state.metadata.get('model')} --pretrained "
                                 f"{state.metadata.get('pretrained')} without --ravl_init, so its start is not this "
                                 f"run's model ({ctx.model_name} / {ctx.pretrained})")
            source = {"state_file": state.path, "method": state.method}
        start = ctx.model if init is None else load_init_model(ctx, init)
        zero = {k: v.detach().cpu().float() for k, v in start.visual.state_dict().items()}
        return zero, {k: v.float() for k, v in tuned.items()}, dict(base), init, source

    def fit(self, ctx: RunContext) -> None:
        ends = self._ends(ctx)
        if ends is None:
            return
        zero, tuned, base, init, source = ends
        self.base_state = base
        val = ctx.features("val")
        curve = []
        for alpha in self.config.alphas:
            self._set(interpolate_state(zero, tuned, alpha), alpha)
            logits = self._logits(ctx, "val", val.keys)
            curve.append(curve_row(alpha, logits, self.config.select, lambda: val.y.numpy(),
                                   lambda: val.group_ids().numpy()))
        alpha, split = choose_alpha(curve, self.config.select, self.config.alpha)
        self._set(interpolate_state(zero, tuned, alpha), alpha)
        self._info = {"alpha": alpha, "selection": {"criterion": self.config.select, "split": split},
                      "curve": curve, "finetuned": source,
                      "start_checkpoint": init if init is not None else f"{ctx.pretrained} (the evaluated model)",
                      "interpolated": "model.visual (every floating-point tensor); text tower: the start model's",
                      "val_feature_passes": len(self.config.alphas)}

    def _set(self, visual: dict[str, torch.Tensor], alpha: float) -> None:
        self.visual_state, self.alpha = visual, float(alpha)
        self._model = None

    # ---- using the fitted model

    def _current(self, ctx: RunContext) -> torch.nn.Module:
        if self.visual_state is None:
            raise RuntimeError(f"{WEIGHTS}: predict() before fit() or load_state_dict()")
        if self._model is None:
            self._model = apply_state(copy.deepcopy(ctx.model), self.visual_state, self.base_state).to(ctx.device).eval()
        return self._model

    def _logits(self, ctx: RunContext, split: str, keys) -> torch.Tensor:
        """Logits of ``split`` under the current interpolated model; its features are cached under a
        key naming the interpolated weights (a rerun reads them back)."""
        model = self._current(ctx)
        ext = ctx.extractor
        tag = f"{ext.pretrained_id}+{WEIGHTS}@{self.alpha:g}:{state_digest(self.visual_state, self.base_state)}"
        extractor = FeatureExtractor(model, ctx.transform, model_type=ext.model_type, model_name=ext.model_name,
                                     pretrained=tag, device=ctx.device, amp=ctx.amp, batch_size=ext.batch_size,
                                     num_workers=ext.num_workers, cache=ext.cache, progress=ctx.progress)
        fs = extractor.extract(ctx.dataset, ctx.dataset_name, split, ["image"])["image"]
        if tuple(fs.keys) != tuple(keys):
            raise DatasetError(f"{WEIGHTS}: split {split!r} was read in another order than its cached features")
        if not self.base_state:
            return ctx.zeroshot_logits(fs.features)
        if self._head is None:  # the start's text tower: the same head at every alpha
            self._head = own_zeroshot_head(ctx, model)
        return logits_with_head(ctx, fs.features, self._head)

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        return self._logits(ctx, split, ctx.features(split).keys)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.visual_state is None:
            return {}
        return {**{f"visual.{k}": v for k, v in self.visual_state.items()},
                **{f"base.{k}": v for k, v in self.base_state.items()}, "alpha": torch.tensor(self.alpha)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        if "alpha" not in state:
            raise StateError(f"{WEIGHTS}: the state has no 'alpha'")
        alpha = float(state.pop("alpha"))
        visual, base = split_state(state)
        self.base_state = dict(base)
        self._set({k: v.float() for k, v in visual.items()}, alpha)
        self._head = None
        self._info = {"alpha": alpha, "loaded_from_state": True}

    def hyperparameters(self) -> dict[str, Any]:
        cfg = self.config
        return {"form": "weight space (image tower)", "alphas": list(cfg.alphas), "select": cfg.select,
                "finetuned_option": cfg.finetuned, **self._info}

    def plots(self) -> Mapping[str, Callable[[str], None]]:
        if not self._info.get("curve"):
            return {}
        return {"curve": curve_writer(self._info, "image tower")}

    def as_open_clip(self, ctx: RunContext) -> torch.nn.Module:
        if self.visual_state is None:
            raise RuntimeError(f"{WEIGHTS}: as_open_clip() before fit() or load_state_dict()")
        return apply_state(copy.deepcopy(ctx.model), self.visual_state, self.base_state)
