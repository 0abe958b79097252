"""The mitigation interface: one shape for methods as different as DFR, CFR, SEraser and RaVL.

A mitigation is created unfitted from its own typed config; ``check(ctx)`` tests its
preconditions before any work; ``fit(ctx)`` reads what it declared in its
:class:`~clip_robust_plugins.specs.Needs` from the :class:`MethodContext` it is handed
(the run's :class:`RunContext` restricted to those splits and labels); ``predict(ctx,
split)`` returns logits row-aligned with ``ctx.features(split)``.  States are flat dicts of
tensors (saved with safetensors, never pickled).  Importing this module imports no torch.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..specs import ModelTriple

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    import torch

    from ..datasets.base import RobustDataset
    from ..features import FeatureExtractor, FeatureKind, FeatureSet
    from ..plugins import Registry
    from ..specs import Needs


class RunContext:
    """Everything a mitigation may use during one evaluation run.

    Features are extracted lazily and memoised, so a method only pays for the splits and
    kinds it asks for, and all methods of a run share them.  The model is built on first
    use of :attr:`model` (or :attr:`transform`, :attr:`tokenizer`): a run whose features and
    zero-shot head are all cached never builds it.  ``registry`` is the run's plugin
    registry (view providers, region proposers, model loaders), handed in, never looked up.

    Run-level settings are plain attributes (``device``, ``amp``, ``seed``, ``model_name``,
    ``pretrained``, ``model_type``, ``model_cache_dir``, ``batch_size``, ``num_workers``);
    a registered record's own settings come typed from :meth:`config` (``config_of`` builds
    them; the engine builds them from the parsed flags; by default, each record's defaults).
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
        eval_split: str,
        progress: bool = True,
        model_name: str = "",
        pretrained: str = "",
        model_type: str = "open_clip",
        model_cache_dir: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        config_of: Callable[[Any], Any] | None = None,
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
        self.eval_split = eval_split
        self.progress = progress
        self.model_name = model_name
        self.pretrained = pretrained
        self.model_type = model_type
        self.model_cache_dir = model_cache_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._config_of = config_of
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
                from ..features.towers import zeroshot_classifier

                head = zeroshot_classifier(self.model, self.tokenizer, self.classnames, self.templates, self.device,
                                           amp=self.amp).float()
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

    # -- registered records, each with its own typed config
    def config(self, spec: Any) -> Any:
        """The typed config of a registered record (an instance of its ``options``; None without)."""
        if getattr(spec, "options", None) is None:
            return None
        return self._config_of(spec) if self._config_of is not None else spec.options()

    def view_provider(self, name: str) -> Callable:
        """A new provider of the registered view provider ``name``, made with its typed config."""
        spec = self.registry.view_provider(name)
        config = self.config(spec)
        return spec.create(config, seed=self.seed) if spec.takes_seed else spec.create(config)

    def region_proposer(self, name: str) -> Callable:
        """A new proposer of the registered region proposer ``name``, made with its typed config."""
        spec = self.registry.region_proposer(name)
        return spec.create(self.config(spec))

    def for_method(self, name: str, needs: Needs) -> MethodContext:
        """This run as method ``name`` sees it: only the splits and labels its ``needs`` declare."""
        return MethodContext(self, name, needs)

    def rng(self, salt: str) -> np.random.Generator:
        """A local numpy generator derived from the run seed and a per-use salt."""
        import numpy as np

        return np.random.default_rng([self.seed, _salt_int(salt)])

    def torch_generator(self, salt: str) -> torch.Generator:
        """A local torch generator derived from the run seed and a per-use salt."""
        import torch

        return torch.Generator().manual_seed((self.seed * 1_000_003 + _salt_int(salt)) % (2**63))


#: label kinds in the order of what they reveal (``labels_used`` records the highest read per split)
LABEL_LEVELS = ("none", "class", "group")


class MethodContext:
    """The run context as one method sees it, enforcing its :class:`~clip_robust_plugins.specs.Needs`.

    Everything of the :class:`RunContext` is there, except that features (and the dataset's
    samples) of a split are refused unless the split is the evaluated one or one of
    ``needs.fit_splits``; class labels (``labels(split)``, ``features(split).y``) only of
    declared fit splits and when ``"class"`` is declared; group labels (``labels(split,
    "group")``, ``.group_ids()``, ``.fields``) only when ``"group"`` is declared.  What was
    read is :meth:`labels_used`, recorded in the results; ``dataset.samples(split)`` records
    carry every label, so reading a fit split's samples counts as reading the declared labels.
    """

    def __init__(self, ctx: RunContext, method: str, needs: Needs):
        self._ctx = ctx
        self.method = method
        self.needs = needs
        self._read: dict[str, str] = {}
        self.dataset = _SplitGuardedDataset(ctx.dataset, self)

    def __getattr__(self, name: str) -> Any:
        if name == "_ctx":  # not yet set (copy, unpickling)
            raise AttributeError(name)
        return getattr(self._ctx, name)

    def _check_split(self, split: str) -> None:
        if split != self._ctx.eval_split and split not in self.needs.fit_splits:
            from ..plugins import PluginError

            raise PluginError(
                f"method {self.method!r} read split {split!r}, which it does not declare (Needs.fit_splits="
                f"{tuple(self.needs.fit_splits)}; the evaluated split {self._ctx.eval_split!r} is always readable)")

    def _note_labels(self, split: str, level: str) -> None:
        from ..plugins import PluginError

        if level not in self.needs.labels:
            raise PluginError(f"method {self.method!r} read {level} labels (of split {split!r}) but declares "
                              f"Needs.labels={sorted(self.needs.labels)}")
        if split not in self.needs.fit_splits:
            raise PluginError(f"method {self.method!r} read {level} labels of split {split!r}, which is not among its "
                              f"Needs.fit_splits={tuple(self.needs.fit_splits)}")
        if LABEL_LEVELS.index(level) > LABEL_LEVELS.index(self._read.get(split, "none")):
            self._read[split] = level

    def _note_samples(self, split: str) -> None:
        """A read of ``dataset.samples(split)``: its records carry every label, so a fit split's
        read counts as reading the labels the method declares (the eval split's: none, unverified)."""
        self._check_split(split)
        if split in self.needs.fit_splits:
            for level in LABEL_LEVELS[1:]:
                if level in self.needs.labels:
                    self._note_labels(split, level)

    def features(self, split: str, kind: FeatureKind = "image") -> FeatureSet:
        self._check_split(split)
        return _LabelGuardedFeatures(self._ctx.features(split, kind), self, split)

    def prefetch(self, split: str, kinds: Sequence[FeatureKind]) -> dict[str, FeatureSet]:
        self._check_split(split)
        return {k: _LabelGuardedFeatures(fs, self, split) for k, fs in self._ctx.prefetch(split, kinds).items()}

    def labels(self, split: str, which: str = "class", grouping: str | None = None) -> torch.Tensor:
        """(N,) int64 labels of ``split`` in the order of ``features(split).keys``: the class
        (``which="class"``) or the group id of ``grouping`` (``which="group"``, default grouping)."""
        if which not in LABEL_LEVELS[1:]:
            raise ValueError(f"labels(): which must be 'class' or 'group', got {which!r}")
        self._check_split(split)
        self._note_labels(split, which)
        fs = self._ctx.features(split)
        if which == "class":
            return fs.y
        return fs.group_ids(grouping) if grouping is not None else fs.group_ids()

    def labels_used(self) -> dict[str, Any]:
        """What this method read: the highest label kind, and per split (none / class / group)."""
        from ..results import labels_used_record

        return labels_used_record(self._read)


class _LabelGuardedFeatures:
    """A :class:`~clip_robust_plugins.features.FeatureSet` whose labels go through the method's declaration."""

    def __init__(self, fs: FeatureSet, view: MethodContext, split: str):
        self._fs, self._view, self._split = fs, view, split

    def __len__(self) -> int:
        return len(self._fs)

    def __getattr__(self, name: str) -> Any:
        if name == "_fs":
            raise AttributeError(name)
        return getattr(self._fs, name)

    @property
    def y(self) -> torch.Tensor:
        self._view._note_labels(self._split, "class")
        return self._fs.y

    @property
    def fields(self) -> torch.Tensor:
        self._view._note_labels(self._split, "group")
        return self._fs.fields

    def group_ids(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._view._note_labels(self._split, "group")
        return self._fs.group_ids(*args, **kwargs)


class _SplitGuardedDataset:
    """The run's dataset, refusing ``samples()`` of a split the method does not declare
    (``isinstance`` sees the dataset's own class)."""

    def __init__(self, dataset: RobustDataset, view: MethodContext):
        self._dataset, self._view = dataset, view

    @property
    def __class__(self) -> type:  # noqa: D105 - isinstance() against the reader's class
        return type(self._dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "_dataset":
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def samples(self, split: str, *args: Any, **kwargs: Any) -> Any:
        self._view._note_samples(split)
        return self._dataset.samples(split, *args, **kwargs)


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
