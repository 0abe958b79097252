"""The ``ravl`` and ``clip_ft`` mitigations: fine-tuning of the image tower on train image-caption
pairs, with RaVL's region terms for ``ravl`` (protocol and deviations: docs/methods/ravl.md)."""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...datasets.base import DatasetError
from ...features import FeatureCache, FeatureExtractor
from ...states import StateError
from ..base import Mitigation, RunContext
from . import data_parallel
from .configs import BASELINE, CITATION, GROUP_DRO, NAME, ClipFtConfig, DiscoveryConfig, FineTuneConfig, RegionConfig
from .loader import apply_state, load_init_model, split_state
from .losses import clip_loss, label_to_region_loss, parse_caption_labels, region_to_label_loss, relevant_regions
from .proposers import proposer_for, region_kind
from .split_discovery import DiscoveryRun, RegionMeta, discover
from .training import batched, caption_table, logits_with_head, own_zeroshot_head, shuffled
from .views import TrainViews, encode_with_token_regions, region_feature_mode

_RAVL_ONLY = ("region_weight", "discovery_split", "region_features", "positive_regions", "negatives",
              "spurious_regions")


def _looks_like_file(name: str) -> bool:
    return os.sep in name or name.endswith((".safetensors", ".pt", ".pth", ".bin"))


class RegionAwareFineTune(Mitigation):
    """``ravl`` (region-aware) and ``clip_ft`` (the CLIP loss alone), differing only in the loss."""

    #: under torchrun every rank takes part in the fit (rank 0 reports): see data_parallel.py
    data_parallel = True

    def __init__(self, method: str, config: FineTuneConfig, discovery: DiscoveryConfig | None = None,
                 regions: RegionConfig | None = None, model_type: str = "open_clip"):
        self.method = method
        self.region_aware = method == NAME
        #: clip_ft_group_dro: GroupDRO over the train groups instead of the plain CLIP loss (see group_dro_loss.py)
        self.objective = "group_dro" if method == GROUP_DRO else "erm"
        #: clip_ft's --ravl_sampling upsample: train key -> sampling weight (set in fit)
        self.sample_weights: dict[str, float] | None = None
        self.config = config
        self.discovery_config = discovery or DiscoveryConfig()
        self.regions = regions or RegionConfig()
        self.model_type = model_type
        self.visual_state: dict[str, torch.Tensor] | None = None
        #: with --ravl_init: the start model's parameters outside the image tower (text tower, ...)
        self.base_state: dict[str, torch.Tensor] = {}
        self._model: torch.nn.Module | None = None
        self._head: torch.Tensor | None = None
        self._logits: dict[str, torch.Tensor] = {}
        self._info: dict[str, Any] = {}
        #: after a ravl fit (not saved): the discovery run and the (N_train, R) spurious-region mask
        self.discovery: DiscoveryRun | None = None
        self.train_spurious: dict[str, np.ndarray] | None = None

    @property
    def truth_key(self) -> str:
        return self.regions.truth_key

    # ---- before any work

    def check(self, ctx: RunContext) -> None:
        from ...states import read_state

        splits = ctx.dataset.splits()
        if "train" not in splits:
            raise ValueError(f"needs a train split, but {ctx.dataset_name} has {list(splits)}")
        if self.region_aware:
            proposer_for(ctx, self.regions.regions)  # an unknown proposer fails here
            split = self.config.discovery_split
            if self.config.spurious_regions == "discovered" and split not in splits:
                raise ValueError(f"--ravl_discovery_split {split!r}: {ctx.dataset_name} has no such split "
                                 f"(splits: {list(splits)})")
        if self.config.init is not None and _looks_like_file(self.config.init) and not os.path.isfile(self.config.init):
            raise ValueError(f"--ravl_init {self.config.init}: no such file")
        model_type = self.model_type = ctx.model_type
        if model_type in (NAME, BASELINE, GROUP_DRO):
            state = read_state(ctx.pretrained)  # a missing or foreign file is a StateError, now
            if state.method != model_type:
                raise StateError(f"{ctx.pretrained}: a state of method {state.method!r}, not {model_type!r} "
                                 f"(--model_type {model_type})")

    @property
    def upsampling(self) -> bool:
        return isinstance(self.config, ClipFtConfig) and self.config.sampling == "upsample"

    def feature_plan(self, ctx: RunContext, fitting: bool) -> Mapping[str, Sequence[Any]]:
        if fitting and self.upsampling and self._errors_model() is None:  # the evaluated model's errors on train
            return {"train": ["image"]}
        if not fitting or not self.region_aware or self.config.spurious_regions == "oracle":
            return {}
        _, proposer = proposer_for(ctx, self.regions.regions)
        kind = region_kind(proposer)
        split = self.config.discovery_split
        if split == "train":
            return {"train": ["image", kind]}
        return {split: ["image", kind], "train": [kind]}

    # ---- fit

    def fit(self, ctx: RunContext) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        proposer = None
        dp = data_parallel.current()
        if self.region_aware:
            proposer_name, proposer = proposer_for(ctx, self.regions.regions)
            if dp is not None and not dp.is_main:  # rank 0 finds the spurious train regions, once
                self.train_spurious = dp.broadcast_object(None)
            elif cfg.spurious_regions == "oracle":
                self.train_spurious = oracle_train_regions(ctx, proposer, self.truth_key)
            else:
                self.discovery = discover(ctx, cfg.discovery_split, proposer_name, proposer, self.discovery_config,
                                          truth_key=self.truth_key)
                self.train_spurious = self._spurious_train_regions(ctx, proposer)
            if dp is not None and dp.is_main:
                dp.broadcast_object(self.train_spurious)
        t_discovery = time.perf_counter()

        start = ctx.model if cfg.init is None else load_init_model(ctx, cfg.init)
        sampling_info = self._upsampling_weights(ctx, start, dp) if self.upsampling else None
        model = copy.deepcopy(start).to(ctx.device)
        del start
        model.eval()
        label_emb = own_zeroshot_head(ctx, ctx.model if cfg.init is None else model).float().T.to(ctx.device)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.visual.parameters():
            p.requires_grad_(True)
        model.visual.train()
        mode, patch = "crops", (1, 1)
        if self.region_aware:
            mode = region_feature_mode(cfg.region_features, model)
            if mode == "tokens":
                ps = model.visual.patch_size
                patch = (ps, ps) if isinstance(ps, int) else tuple(ps)
        dro = None
        if self.objective == "group_dro":
            from .group_dro_loss import GroupDRO

            dro = GroupDRO(ctx.schema.n_groups(), cfg.dro_eta, ctx.device)
        history, n_images = self._train(ctx, model, TrainViews(ctx.transform, proposer, mode, patch), label_emb, mode,
                                        dro)
        t_end = time.perf_counter()
        self.visual_state = {k: v.detach().cpu().clone() for k, v in model.visual.state_dict().items()}
        self.base_state = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                            if not k.startswith("visual.")} if cfg.init is not None else {})
        self._model, self._head, self._logits = None, None, {}
        info: dict[str, Any] = {
            "labels_used": ["class"] + (["regions (oracle)"] if self.region_aware and cfg.spurious_regions == "oracle"
                                        else []),
            "trained": "model.visual (every parameter); text tower and logit scale frozen",
            "start_checkpoint": cfg.init if cfg.init is not None else f"{ctx.pretrained} "
                                                                       "(the evaluated model)",
            "loss": ("(1 - w) L_CLIP + w (L_R + L_A)" if self.region_aware
                     else "GroupDRO over train groups of the per-pair L_CLIP" if dro is not None else "L_CLIP"),
            "losses_per_epoch": history,
            "train_images_seen": n_images,
            "processes": dp.world_size if dp is not None else 1,
            "seconds": {"discovery": round(t_discovery - t0, 3), "training": round(t_end - t_discovery, 3)},
        }
        info.update(self._baseline_info(ctx, sampling_info, dro))
        if self.region_aware:
            info["spurious_train_regions"] = int(sum(m.sum() for m in self.train_spurious.values()))
            info["regions"] = proposer.config
            info["region_features_used"] = mode
            if self.discovery is not None:
                info["discovery"] = self.discovery.summary()
                info["features_read"] = {cfg.discovery_split: ["image", f"regions[{proposer.config}]"],
                                         "train": [f"regions[{proposer.config}]"]}
        self._info = info

    def _errors_model(self) -> str | None:
        """The checkpoint whose zero-shot errors are upsampled (None: the evaluated model)."""
        return self.config.init if self.config.upsample_errors_of == "start" else None

    def _baseline_info(self, ctx: RunContext, sampling_info: dict | None, dro: Any) -> dict[str, Any]:
        """What the robust fine-tuning baselines did (clip_ft and clip_ft_group_dro only)."""
        if not isinstance(self.config, ClipFtConfig):
            return {}
        info: dict[str, Any] = {"sampling_used": sampling_info or {"sampling": "uniform"}, "objective": self.objective}
        if dro is not None:
            info["labels_used"] = ["class", "group (train)"]
            info["group_weights_final"] = {name: round(float(q), 5)
                                           for name, q in zip(ctx.schema.group_names(), dro.q.cpu())}
        return info

    def _upsampling_weights(self, ctx: RunContext, start: torch.nn.Module,
                            dp: data_parallel.DataParallel | None) -> dict[str, Any]:
        """``self.sample_weights`` from a model's zero-shot errors on train (rank 0 computes
        them and sends them, so every rank draws the same global batches)."""
        from .sampling import upsample_weights, zero_shot_errors

        if dp is not None and not dp.is_main:
            self.sample_weights, summary = dp.broadcast_object(None)
            return summary
        errors_of = self._errors_model()
        keys, wrong = zero_shot_errors(ctx, start, errors_of)
        p, factor = upsample_weights(wrong, self.config.upsample_factor)
        self.sample_weights = dict(zip(keys, p.tolist()))
        who = f"the start model ({errors_of})" if errors_of is not None else f"the evaluated model ({ctx.pretrained})"
        summary = {"sampling": "upsample", "rule": f"misclassified zero-shot on train by {who} (JTT-style)",
                   "errors_of": self.config.upsample_errors_of,
                   "misclassified": int(wrong.sum()), "train_images": len(wrong), "factor_used": round(factor, 5),
                   "draws_per_epoch": len(wrong), "with_replacement": True}
        if dp is not None:
            dp.broadcast_object((self.sample_weights, summary))
        return summary

    def _epoch_stream(self, ctx: RunContext, views_transform: TrainViews, gen: np.random.Generator):
        """One epoch of train samples: each once (uniform), or each as often as a weighted draw with
        replacement picks it (upsample)."""
        stream = torch.utils.data.DataLoader(ctx.dataset.samples("train", views_transform),
                                             batch_size=None, num_workers=ctx.extractor.num_workers)
        if self.sample_weights is None:
            return stream
        from .sampling import epoch_counts, repeated

        keys = list(self.sample_weights)
        counts = epoch_counts(np.array([self.sample_weights[k] for k in keys]), gen)
        return repeated(stream, dict(zip(keys, counts.tolist())))

    def _train(self, ctx: RunContext, model: torch.nn.Module, views_transform: TrainViews, label_emb: torch.Tensor,
               mode: str, dro: Any = None) -> tuple[list[dict[str, float]], int]:
        cfg = self.config
        captions, caption_emb = caption_table(ctx, model)
        offsets = np.cumsum([0] + [len(c) for c in captions])
        flat_captions = [c for per_class in captions for c in per_class]
        params = [p for p in model.visual.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        dp = data_parallel.current()
        if dp is not None:
            dp.broadcast_parameters(model.visual.parameters())
        gen = ctx.rng(f"{self.method}/train")
        use_amp = ctx.amp and torch.device(ctx.device).type == "cuda"
        history = []
        n_images = 0
        for epoch in range(cfg.epochs):
            stream = self._epoch_stream(ctx, views_transform, gen)
            sums = {"loss": 0.0, "clip": 0.0, "region_to_label": 0.0, "label_to_region": 0.0, "steps": 0}
            bar = tqdm(desc=f"{self.method} epoch {epoch + 1}/{cfg.epochs}", unit="img", disable=not ctx.progress,
                       file=sys.stderr, leave=False)
            with bar:
                for batch in batched(shuffled(stream, cfg.shuffle_buffer, gen), cfg.batch_size):
                    keys = [item[0] for item in batch]
                    y_true = np.array([int(item[2][ctx.schema.class_index]) for item in batch])
                    # one caption per image: a template drawn at random, filled with the class name
                    picks = [offsets[c] + int(gen.integers(len(captions[c]))) for c in y_true]
                    batch_captions = [flat_captions[j] for j in picks]
                    labels = torch.tensor(parse_caption_labels(batch_captions, ctx.classnames), device=ctx.device)
                    image_emb, region_emb = self._encode(ctx, model, batch, mode, dp, use_amp)
                    image_emb = F.normalize(image_emb.float(), dim=-1)
                    if dro is not None:
                        from .group_dro_loss import clip_loss_per_sample

                        groups = torch.from_numpy(ctx.schema.group_ids(np.stack([np.asarray(item[2]) for item in batch])))
                        per_pair = clip_loss_per_sample(image_emb, caption_emb[picks], labels, cfg.temperature)
                        l_clip, loss = per_pair.mean(), dro.loss(per_pair, groups.long().to(ctx.device))
                    else:
                        l_clip = clip_loss(image_emb, caption_emb[picks], labels, cfg.temperature)
                        loss = l_clip
                    if self.region_aware:
                        region_emb = F.normalize(region_emb.float(), dim=-1)
                        valid = torch.stack([item[1]["valid"] for item in batch]).to(ctx.device)
                        spurious = torch.from_numpy(np.stack([self.train_spurious[k] for k in keys])).to(ctx.device)
                        l_r, l_a = self.region_terms(region_emb, valid, spurious, labels, label_emb)
                        loss = (1 - cfg.region_weight) * l_clip + cfg.region_weight * (l_r + l_a)
                        sums["region_to_label"] += l_r.item()
                        sums["label_to_region"] += l_a.item()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if dp is not None:
                        dp.average_gradients(params)
                    opt.step()
                    sums["loss"] += loss.item()
                    sums["clip"] += l_clip.item()
                    sums["steps"] += 1
                    n_images += len(batch)
                    bar.update(len(batch))
            steps = max(sums.pop("steps"), 1)
            history.append({k: round(v / steps, 5) for k, v in sums.items()})
        return history, n_images

    def _encode(self, ctx: RunContext, model: torch.nn.Module, batch: list, mode: str,
                dp: data_parallel.DataParallel | None, use_amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and region embeddings of a batch; under torchrun this rank encodes its slice and the
        global batch is gathered (differentiably)."""
        mine = batch if dp is None else dp.local(batch)
        if mine:
            views = torch.stack([item[1]["views"] for item in mine]).to(ctx.device)
            with torch.autocast(torch.device(ctx.device).type, dtype=torch.bfloat16, enabled=use_amp):
                if mode == "tokens" and self.region_aware:
                    weights = torch.stack([item[1]["weights"] for item in mine]).to(ctx.device)
                    image_emb, region_emb = encode_with_token_regions(model, views[:, 0], weights)
                else:  # every view through the tower: the image, then its region views
                    emb = model.encode_image(views.flatten(0, 1)).unflatten(0, views.shape[:2])
                    image_emb, region_emb = emb[:, 0], emb[:, 1:]
        else:  # a last batch smaller than the number of ranks: this rank has nothing to encode
            width = ctx.zeroshot_head().shape[0]
            n_regions = len(batch[0][1]["valid"]) if self.region_aware else 0
            image_emb = torch.zeros(0, width, device=ctx.device)
            region_emb = torch.zeros(0, n_regions, width, device=ctx.device)
        if dp is not None:
            image_emb = dp.gather(image_emb.float(), len(batch))
            if self.region_aware:
                region_emb = dp.gather(region_emb.float(), len(batch))
        return image_emb, region_emb

    def region_terms(self, region_emb: torch.Tensor, valid: torch.Tensor, spurious: torch.Tensor,
                     labels: torch.Tensor, label_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``L_R`` and ``L_A`` of a batch under --ravl_positive_regions / --ravl_negatives."""
        cfg = self.config
        usable = valid & ~spurious
        if cfg.positive_regions == "relevant":
            usable = relevant_regions(region_emb, usable, labels, label_emb)
        l_r = region_to_label_loss(region_emb, usable, labels, label_emb, cfg.temperature)
        l_a = label_to_region_loss(region_emb, valid, spurious, labels, label_emb, cfg.temperature, positives=usable,
                                   other_class_negatives=cfg.negatives == "spurious+other_classes")
        return l_r, l_a

    def _spurious_train_regions(self, ctx: RunContext, proposer: Callable) -> dict[str, np.ndarray]:
        """Per train key, which regions are spurious: nearest medoid (cosine) is the top cluster's."""
        train = ctx.features("train", region_kind(proposer))
        top = self.discovery.result.top_cluster
        if top is None:
            warnings.warn(f"{self.method}: discovery kept no cluster, so no train region is spurious; "
                          "the region terms only align regions with their labels", stacklevel=3)
            return {k: np.zeros(train.features.shape[1], dtype=bool) for k in train.keys}
        medoids = torch.from_numpy(self.discovery.medoid_embeddings()).float()
        nearest = (F.normalize(train.features.float(), dim=-1) @ F.normalize(medoids, dim=-1).T).argmax(-1)
        mask = (nearest == top).numpy()
        return dict(zip(train.keys, mask))

    # ---- using the fitted model

    def _finetuned(self, ctx: RunContext) -> torch.nn.Module:
        if self.visual_state is None:
            raise RuntimeError(f"{self.method}: predict() before fit() or load_state_dict()")
        if self._model is None:
            self._model = apply_state(copy.deepcopy(ctx.model), self.visual_state, self.base_state).to(ctx.device).eval()
        return self._model

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        if split not in self._logits:
            model = self._finetuned(ctx)
            extractor = FeatureExtractor(
                model, ctx.transform, model_type=ctx.extractor.model_type, model_name=ctx.extractor.model_name,
                pretrained=f"{ctx.extractor.pretrained_id}+{self.method}", device=ctx.device, amp=ctx.amp,
                batch_size=ctx.extractor.batch_size, num_workers=ctx.extractor.num_workers,
                cache=FeatureCache(None), progress=ctx.progress,  # a fitted model is not worth a cache entry
            )
            fs = extractor.extract(ctx.dataset, ctx.dataset_name, split, ["image"])["image"]
            if fs.keys != ctx.features(split).keys:
                raise DatasetError(f"{self.method}: split {split!r} was read in another order than its cached features")
            if self.base_state:  # started from --ravl_init: its own text tower gives the head
                if self._head is None:
                    self._head = own_zeroshot_head(ctx, model)
                self._logits[split] = logits_with_head(ctx, fs.features, self._head)
            else:
                self._logits[split] = ctx.zeroshot_logits(fs.features)
        return self._logits[split]

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.visual_state is None:
            return {}
        return {**{f"visual.{k}": v for k, v in self.visual_state.items()},
                **{f"base.{k}": v for k, v in self.base_state.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        visual, base = split_state(state)
        self.visual_state = {k: v.float() for k, v in visual.items()}
        self.base_state = dict(base)
        self._model, self._head, self._logits = None, None, {}
        self._info = {"loaded_from_state": True}

    def hyperparameters(self) -> dict[str, Any]:
        hp: dict[str, Any] = {"method": f"{self.method} ({'RaVL, ' + CITATION if self.region_aware else 'CLIP loss only'})",
                              "model_type": self.model_type, **asdict(self.config)}
        if self.region_aware:
            hp["discovery_config"] = asdict(self.discovery_config)
            hp["region_config"] = asdict(self.regions)
        else:
            for key in _RAVL_ONLY:
                hp.pop(key)
        return {**hp, **self._info}

    def as_open_clip(self, ctx: RunContext) -> torch.nn.Module:
        """A copy of ``ctx.model`` with the fine-tuned image tower (and, after --ravl_init, the start's text tower)."""
        if self.visual_state is None:
            raise RuntimeError(f"{self.method}: as_open_clip() before fit() or load_state_dict()")
        return apply_state(copy.deepcopy(ctx.model), self.visual_state, self.base_state)


def oracle_train_regions(ctx: RunContext, proposer: Callable, truth_key: str) -> dict[str, np.ndarray]:
    """Diagnostic: per train key, the regions labelled spurious by ``truth_key``'s boxes (``region_is_labelled``)."""
    loader = torch.utils.data.DataLoader(ctx.dataset.samples("train", RegionMeta(proposer, truth_key)),
                                         batch_size=ctx.extractor.batch_size, num_workers=ctx.extractor.num_workers)
    out: dict[str, np.ndarray] = {}
    for keys, meta, _fields in loader:
        for i, key in enumerate(keys):
            truth = meta["truth"][i].numpy()
            if (truth < 0).any():
                raise DatasetError(f"sample {key!r}: no {truth_key!r} region label in its metadata "
                                   f"(--ravl_spurious_regions oracle)")
            out[key] = truth.astype(bool) & meta["valid"][i].numpy().astype(bool)
    return out
