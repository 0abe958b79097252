"""The mitigation interface: one shape for methods as different as DFR, CFR, SEraser and RaVL.

A mitigation is created unfitted from the CLI options; ``check(ctx)`` tests its
preconditions before any work; ``fit(ctx)`` reads what it declared in its
:class:`~clip_robust_plugins.records.Needs` from the :class:`RunContext`; ``predict(ctx,
split)`` returns logits row-aligned with ``ctx.features(split)``.  States are flat dicts of
tensors (saved with safetensors, never pickled).  Importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..records import ModelTriple

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

    from ..datasets.base import RobustDataset
    from ..features import FeatureExtractor, FeatureKind, FeatureSet
    from ..plugins import Registry


class RunContext:
    """Everything a mitigation may use during one evaluation run.

    Features are extracted lazily and memoised, so a method only pays for the splits and
    kinds it asks for, and all methods of a run share them.  The model is built on first
    use of :attr:`model` (or :attr:`transform`, :attr:`tokenizer`): a run whose features and
    zero-shot head are all cached never builds it.  ``registry`` is the run's plugin
    registry (view providers, region proposers, model loaders), handed in, never looked up.
    """

    def __init__(
        self,
        *,
        dataset: RobustDataset,
        dataset_name: str,
        classnames: Sequence[str],
        templates: Sequence[str] | dict,
        load_model: Callable[[], ModelTriple],
        extractor: FeatureExtractor,
        registry: Registry,
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
        self.extractor = extractor
        self.registry = registry
        self.device = device
        self.amp = amp
        self.seed = seed
        self.options = options
        self.eval_split = eval_split
        self.progress = progress
        self._load_model = load_model
        self._model: ModelTriple | None = None
        self._features: dict[tuple[str, str], FeatureSet] = {}
        self._head: torch.Tensor | None = None
        self.head_cache_path: str | None = None

    # -- the model, built on first use
    def _triple(self) -> ModelTriple:
        if self._model is None:
            self._model = self._load_model()
        return self._model

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> torch.nn.Module:
        return self._triple()[0]

    @property
    def transform(self) -> Callable:
        return self._triple()[1]

    @property
    def tokenizer(self) -> Callable:
        return self._triple()[2]

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def features(self, split: str, kind: FeatureKind = "image") -> FeatureSet:
        """Features of ``split`` (cached on disk and in memory).

        ``kind`` is a name from :data:`~clip_robust_plugins.features.FEATURE_KINDS` or an
        :class:`~clip_robust_plugins.features.ImageSetKind` (views, regions: (N, V, D)).
        """
        from ..features import kind_name

        return self.prefetch(split, (kind,))[kind_name(kind)]

    def prefetch(self, split: str, kinds: Sequence[FeatureKind]) -> dict[str, FeatureSet]:
        """Extract several kinds of one split in a single pass over its images."""
        from ..features import kind_name

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
        """The (D, C) zero-shot classifier, computed exactly as clip_benchmark does.

        Cached beside the features (keyed by model, checkpoint, class names and templates),
        so a warm run needs no model for it.
        """
        if self._head is None:
            key = self.extractor.head_key(self.classnames, self.templates)
            head, self.head_cache_path = self.extractor.cache.load_head(key)
            if head is None:
                import functools

                import clip_benchmark.metrics.zeroshot_classification as cb_zs

                saved = cb_zs.tqdm  # clip_benchmark's bar ignores --quiet: silence it for this call
                cb_zs.tqdm = functools.partial(saved, disable=not self.progress)
                try:
                    head = cb_zs.zero_shot_classifier(
                        self.model, self.tokenizer, self.classnames, self.templates, self.device, amp=self.amp
                    ).float()
                finally:
                    cb_zs.tqdm = saved
                self.head_cache_path = self.extractor.cache.save_head(key, head)
            self._head = head.to(self.device)
        return self._head

    def zeroshot_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``100 * features @ head`` under the run's autocast, as clip_benchmark scores."""
        import torch

        from ..features import autocast

        head = self.zeroshot_head()
        with torch.no_grad(), autocast(self.device, self.amp):
            logits = 100.0 * features.to(self.device) @ head
        return logits.float().cpu()

    def rng(self, salt: str) -> np.random.Generator:
        """A local numpy generator derived from the run seed and a per-use salt."""
        import numpy as np

        return np.random.default_rng([self.seed, _salt_int(salt)])

    def torch_generator(self, salt: str) -> torch.Generator:
        """A local torch generator derived from the run seed and a per-use salt."""
        import torch

        return torch.Generator().manual_seed((self.seed * 1_000_003 + _salt_int(salt)) % (2**63))


def _salt_int(salt: str) -> int:
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little")


class Mitigation(ABC):
    """One mitigation method, unfitted until :meth:`fit` (or :meth:`load_state_dict`)."""

    def check(self, ctx: RunContext) -> None:  # noqa: B027 - optional, like plots()
        """Raise a one-line error when this run cannot work (a split lacks masks, a state
        file is missing, ...).  Called for every method before the model is built or any
        feature extracted; must not touch ``ctx.model`` or extract features."""

    def feature_plan(self, ctx: RunContext, fitting: bool) -> Mapping[str, Sequence[FeatureKind]]:
        """Feature kinds per split this method will read, so the engine extracts every kind
        of a split in one read of it.  Default: the spec's ``Needs`` (``fitting`` is False
        when a saved state replaces the fit).  Methods that read image-set kinds (views,
        regions) add them here."""
        return {}

    def plots(self) -> Mapping[str, Callable[[str], None]]:
        """Figures of the fit (name -> ``writer(png_path)``), written as
        ``<output>_<method>_<name>.png`` beside the results when ``--plot`` is given."""
        return {}

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
