"""The mitigation interface: one shape for methods as different as DFR, CFR, SEraser and RaVL.

A mitigation is created unfitted from the CLI options, ``fit(ctx)`` reads whatever it
declared in its :class:`~clip_robust_plugins.records.Needs` from the :class:`RunContext`
(cached features of any split, the zero-shot text head, the live model), then
``predict(ctx, split)`` returns logits row-aligned with ``ctx.features(split)``.

The fitted state is a flat dict of tensors (``state_dict``/``load_state_dict``), saved
with safetensors, never pickled; ``hyperparameters()`` goes into the results JSON.
Methods that keep CLIP's embedding space also return an open_clip-compatible model
from ``as_open_clip(ctx)`` (see :class:`AdaptedCLIP`), usable by any clip_benchmark task.
"""

from __future__ import annotations

import argparse
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.base import RobustDataset
from ..features import FeatureExtractor, FeatureKind, FeatureSet, autocast, kind_name


class RunContext:
    """Everything a mitigation may use during one evaluation run.

    Features are extracted lazily and memoised, so a method only pays for the splits
    and kinds it asks for, and all methods of a run share them.
    """

    def __init__(
        self,
        *,
        dataset: RobustDataset,
        dataset_name: str,
        classnames: Sequence[str],
        templates: Sequence[str] | dict,
        model: torch.nn.Module,
        tokenizer: Callable,
        transform: Callable,
        extractor: FeatureExtractor,
        device: str,
        amp: bool,
        seed: int,
        options: argparse.Namespace,
        eval_split: str,
        progress: bool = True,
    ):
        self.dataset = dataset
        self.dataset_name = dataset_name
        self.schema = dataset.schema
        self.classnames = list(classnames)
        self.templates = templates
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.extractor = extractor
        self.device = device
        self.amp = amp
        self.seed = seed
        self.options = options
        self.eval_split = eval_split
        self.progress = progress
        self._features: dict[tuple[str, str], FeatureSet] = {}
        self._head: torch.Tensor | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def features(self, split: str, kind: FeatureKind = "image") -> FeatureSet:
        """Features of ``split`` (cached on disk and in memory).

        ``kind`` is a name from :data:`~clip_robust_plugins.features.FEATURE_KINDS` or an
        :class:`~clip_robust_plugins.features.ImageSetKind` (views, regions: (N, V, D)).
        """
        return self.prefetch(split, (kind,))[kind_name(kind)]

    def prefetch(self, split: str, kinds: Sequence[FeatureKind]) -> dict[str, FeatureSet]:
        """Extract several kinds of one split in a single pass over its images."""
        if split not in self.dataset.splits():
            raise ValueError(f"dataset {self.dataset_name!r} has no split {split!r} (splits: {list(self.dataset.splits())})")
        missing = [k for k in kinds if (split, kind_name(k)) not in self._features]
        if missing:
            got = self.extractor.extract(self.dataset, self.dataset_name, split, missing)
            for name, fs in got.items():
                self._features[(split, name)] = fs
        return {kind_name(k): self._features[(split, kind_name(k))] for k in kinds}

    def cache_paths(self) -> list[str]:
        """The feature-cache files this run read or wrote."""
        return sorted({fs.cache_path for fs in self._features.values() if fs.cache_path})

    def zeroshot_head(self) -> torch.Tensor:
        """The (D, C) zero-shot classifier, computed exactly as clip_benchmark does."""
        if self._head is None:
            from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

            self._head = zero_shot_classifier(
                self.model, self.tokenizer, self.classnames, self.templates, self.device, amp=self.amp
            ).float()
        return self._head

    def zeroshot_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``100 * features @ head`` under the run's autocast, as clip_benchmark scores."""
        head = self.zeroshot_head()
        with torch.no_grad(), autocast(self.device, self.amp):
            logits = 100.0 * features.to(self.device) @ head
        return logits.float().cpu()

    def rng(self, salt: str) -> np.random.Generator:
        """A local numpy generator derived from the run seed and a per-use salt."""
        return np.random.default_rng([self.seed, _salt_int(salt)])

    def torch_generator(self, salt: str) -> torch.Generator:
        """A local torch generator derived from the run seed and a per-use salt."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + _salt_int(salt)) % (2**63))


def _salt_int(salt: str) -> int:
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little")


class Mitigation(ABC):
    """One mitigation method, unfitted until :meth:`fit` (or :meth:`load_state_dict`)."""

    @abstractmethod
    def fit(self, ctx: RunContext) -> None:
        """Fit from what the method's ``Needs`` declared (cached features, head, model)."""

    @abstractmethod
    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        """(N, C) float logits, rows in the order of ``ctx.features(split).keys``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted state as named tensors (saved with safetensors)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a fitted state produced by :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state to load, got {sorted(state)}")

    def hyperparameters(self) -> dict[str, Any]:
        """JSON-able settings and choices (e.g. a selected C), recorded in the results."""
        return {}

    def as_open_clip(self, ctx: RunContext) -> torch.nn.Module | None:
        """An open_clip-compatible model when the method keeps CLIP's embedding space."""
        return None


class AdaptedCLIP(torch.nn.Module):
    """An open_clip-compatible model whose image embeddings pass through an adapter.

    Exposes ``encode_image``, ``encode_text``, ``logit_scale`` and ``forward`` like
    ``open_clip.CLIP``, so clip_benchmark tasks (zero-shot, retrieval, linear probe)
    run on a mitigated model.  The adapter maps the base model's image embedding to a
    new embedding in the same space; the text tower is the base model's, unchanged.
    """

    def __init__(self, base: torch.nn.Module, image_adapter: torch.nn.Module):
        super().__init__()
        self.base = base
        self.image_adapter = image_adapter

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.base.logit_scale

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_adapter(self.base.encode_image(image))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.base.encode_text(text, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()
