"""The small typed records that plugins register.

Every registered thing has a unique ``name``.  Plugins hand these records to the
``register`` callback of the matching hook (see :mod:`clip_robust_plugins.hookspecs`);
the records carry callables, never classes the engine must know about, so the engine
treats a built-in and a third-party contribution the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from PIL import Image

    from .datasets.base import RobustDataset, SampleImage
    from .mitigations.base import Mitigation


@dataclass(frozen=True)
class DatasetRequest:
    """What a dataset loader is given: where the data lives and its own typed config.

    ``config`` is an instance of the spec's ``options`` dataclass (None when it declares
    none).  ``options`` is the whole parsed namespace, kept only for readers that still
    declare flags through the legacy ``add_arguments`` hook; new readers use ``config``.
    """

    root: str
    options: argparse.Namespace = field(default_factory=argparse.Namespace)
    #: the dataset's own typed config (an instance of its spec's ``options`` dataclass), when it declares one
    config: Any = None


@dataclass(frozen=True)
class DatasetSpec:
    """A group-robustness dataset, evaluated as ``--dataset robust/<name>``."""

    name: str
    load: Callable[[DatasetRequest], RobustDataset]
    description: str = ""
    citation: str = ""
    #: a dataclass of :func:`~clip_robust_plugins.argtypes.option` fields: its flags are
    #: ``--<option_prefix><field>``, and ``load`` gets an instance as ``request.config``
    options: type | None = None
    option_prefix: str = ""


@dataclass(frozen=True)
class Predictions:
    """What a metric sees: one method's outputs on one split, with the sample metadata.

    ``logits`` is (N, C) float32 (may be None for methods that only emit labels),
    ``pred`` (N,) int64, ``fields`` (N, n_fields) int64 in ``schema`` field order.
    """

    method: str
    split: str
    keys: tuple[str, ...]
    pred: Any  # np.ndarray (N,)
    fields: Any  # np.ndarray (N, n_fields)
    schema: Any  # GroupSchema
    logits: Any = None  # np.ndarray (N, C) | None

    @property
    def y(self):
        return self.fields[:, self.schema.class_index]


@dataclass(frozen=True)
class MetricSpec:
    """A metric: ``compute(predictions)`` returns flat ``{key: float | str}``.

    Keys are relative (``worst_group_acc``, ``group_acc/<group>``); the engine prefixes
    them with ``<method>/``.  Fractions are in [0, 1].  A metric that needs more than the
    predictions (the method's image encoder, e.g. region-level accuracy) sets
    ``takes_context`` and is called ``compute(predictions, ctx=RunContext, mitigation=Mitigation)``.
    """

    name: str
    compute: Callable[..., Mapping[str, float | str]]
    description: str = ""
    takes_context: bool = False
    #: a dataclass of option fields (flags ``--<option_prefix><field>``); when set,
    #: ``compute`` is also passed ``config=`` (an instance of it)
    options: type | None = None
    option_prefix: str = ""


@dataclass(frozen=True)
class Needs:
    """What a mitigation needs, declared up front so the engine can plan one extraction pass.

    - ``fit_splits``: splits whose data the fit reads (e.g. ``("val",)`` for DFR); the only
      splits besides the evaluated one whose features the method may read, and the only ones
      whose labels it may read (enforced by the run context the method is handed).
    - ``labels``: labels the *fit* uses, a subset of ``{"class", "group"}``; reading a kind
      not declared is an error, and what was read is recorded as ``labels_used``.
    - ``feature_kinds``: extractor outputs the method reads (``"image"`` = L2-normalised
      image embeddings; later kinds: pre-projection features, views, regions).
    - ``live_model``: the method runs the open_clip model itself (gradients through a
      tower, e.g. test-time prompt tuning, or fine-tuning).  When no method needs it and
      every feature and the zero-shot head are cached, a run never builds the model.
    """

    fit_splits: tuple[str, ...] = ()
    labels: frozenset[str] = frozenset()
    feature_kinds: tuple[str, ...] = ("image",)
    live_model: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "fit_splits": list(self.fit_splits),
            "labels": sorted(self.labels),
            "feature_kinds": list(self.feature_kinds),
            "live_model": self.live_model,
        }


@dataclass(frozen=True)
class MitigationSpec:
    """A mitigation: ``create(config)`` returns a fresh, unfitted :class:`Mitigation`.

    ``config`` is an instance of ``options`` (None when the method declares no options).
    """

    name: str
    create: Callable[[Any], Mitigation]
    needs: Needs = Needs()
    description: str = ""
    citation: str = ""
    #: extra ``eval`` flags the offline demo passes for this method (settings chosen for the
    #: tiny model and spurious_shapes, where they differ from the method's defaults)
    demo_flags: tuple[str, ...] = ()
    #: the method every run evaluates first and compares the others with (exactly one
    #: registered method, zero-shot, sets this)
    baseline: bool = False
    #: a dataclass of :func:`~clip_robust_plugins.argtypes.option` fields: its flags are
    #: ``--<option_prefix><field>``, and ``create`` is called with an instance of it
    options: type | None = None
    option_prefix: str = ""


ModelTriple = tuple["torch.nn.Module", Callable, Callable]


@dataclass(frozen=True)
class ModelLoaderSpec:
    """A model type, clip_benchmark-style: ``load(model_name, pretrained, cache_dir, device)``.

    Returns ``(model, transform, tokenizer)`` exactly like clip_benchmark's loaders, so a
    registered loader is also offered to clip_benchmark's own tasks as ``--model_type``.
    A loader that resolves other registrations (checkpoints, other model types) sets
    ``takes_registry`` and is then also passed ``registry=`` (see :meth:`bind`).
    """

    name: str
    load: Callable[..., ModelTriple]
    description: str = ""
    takes_registry: bool = False
    #: ``check(model_name, pretrained, registry=)`` raises a one-line error for a model name or
    #: ``--pretrained`` the loader cannot load, before any data is read (None: no check)
    check: Callable[..., None] | None = None

    def bind(self, registry: Any) -> Callable[..., ModelTriple]:
        """The loader with clip_benchmark's signature, handed ``registry`` when it takes one."""
        if not self.takes_registry:
            return self.load
        import functools

        return functools.partial(self.load, registry=registry)


@dataclass(frozen=True)
class CommandContext:
    """What a subcommand is handed besides its own config: the run's registry and plugin
    manager, and the host's services over this command line's parsed flags (so the command
    never reads the namespace): ``config_of(spec)`` is a registered record's typed config
    (a dataset's, a region proposer's), ``load_dataset(dataset, dataset_root)`` a dataset read
    the way ``eval`` reads it (``robust/<name>`` or ``wds/<name>``, with the data flags)."""

    registry: Any  # plugins.Registry
    plugin_manager: Any  # pluggy.PluginManager
    config_of: Callable[[Any], Any] = field(default=lambda spec: None)
    load_dataset: Callable[[str, str], Any] | None = None
    #: ``flag_values(kind, name)``: a record's settings by flag name (its config and its plugin's
    #: legacy flags), the provenance a command writes beside its output
    flag_values: Callable[[str, str], dict[str, Any]] = field(default=lambda kind, name: {})


@dataclass(frozen=True)
class CommandSpec:
    """A ``clip_benchmark_robust`` subcommand.

    Its flags are one ``options`` dataclass of :func:`~clip_robust_plugins.argtypes.option`
    fields (``--<option_prefix><field>``; required flags and positional inputs included),
    added only when that subcommand runs or asks for ``--help``.  ``record_flags`` names the
    registry tables whose records' flags the command also accepts (``"datasets"``,
    ``"region_proposers"``).  ``run(config, ctx)`` gets the typed config (None without
    ``options``) and a :class:`CommandContext`, and returns an exit status (None = 0).  An
    error in the user's input raises one of the package's error types (``EvalError``,
    ``DatasetError``, ``PluginError``, ...), shown as one line.
    """

    name: str
    help: str
    run: Callable[[Any, CommandContext], int | None]
    options: type | None = None
    option_prefix: str = ""
    record_flags: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class CheckpointSpec:
    """A local checkpoint that ``--model <model> --pretrained <pretrained>`` resolves to.

    ``config`` is an open_clip model-config JSON registered with ``open_clip.add_model_config``
    so the architecture name is known even when ``pretrained`` is a user's own file.
    """

    model: str
    pretrained: str
    path: Path
    config: Path | None = None
    description: str = ""

    @property
    def name(self) -> str:
        return f"{self.model},{self.pretrained}"


@dataclass(frozen=True)
class SampleViews:
    """Foreground-only and background-only views of one sample (PIL images).

    A provider returns the same numbers of views for every sample (they are embedded
    as fixed-size (N, V, D) feature blocks).
    """

    foreground: tuple[Image.Image, ...]
    background: tuple[Image.Image, ...]


@dataclass(frozen=True)
class ViewProviderSpec:
    """Foreground/background views for methods such as SEraser (``--seraser_views NAME``).

    ``create(config)`` returns a picklable callable ``provider(sample) -> SampleViews``
    taking a :class:`~clip_robust_plugins.datasets.base.SampleImage` (image, metadata,
    mask).  The provider object must have a ``config`` string attribute naming its
    settings (it enters the feature-cache key) and int attributes ``n_foreground`` and
    ``n_background``, the numbers of views it returns for every sample (views are
    embedded as fixed-size blocks, so the counts are needed before any sample is read).
    A segmenter (e.g. Grounded-SAM) plugs in here as a third-party plugin.

    ``config`` is an instance of ``options`` (flags ``--<option_prefix><field>``, None when
    none are declared); a provider whose views are random sets ``takes_seed`` and is then
    called ``create(config, seed=<the run's --seed>)``.
    """

    name: str
    create: Callable[..., Callable[[SampleImage], SampleViews]]
    description: str = ""
    options: type | None = None
    option_prefix: str = ""
    takes_seed: bool = False


#: a region as ``(x0, y0, x1, y1)`` in pixels of the sample image, x1/y1 exclusive
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class RegionProposerSpec:
    """Image regions for region-level methods such as RaVL (``--ravl_regions NAME``).

    ``create(config)`` returns a picklable callable ``proposer(sample) -> list[Box]``
    taking a :class:`~clip_robust_plugins.datasets.base.SampleImage`; it must return
    the same number of boxes for every sample, declared up front as an int attribute
    ``count`` (region features are fixed-size (N, count, D) blocks), and carry a
    ``config`` string attribute naming its settings (it enters the feature-cache key).
    Boxes are ``(x0, y0, x1, y1)`` pixels inside the image; a repeated box counts as
    padding and is ignored by RaVL.  ``config`` is an instance of ``options`` (flags
    ``--<option_prefix><field>``; None when none are declared).
    """

    name: str
    create: Callable[[Any], Callable[[SampleImage], Sequence[Box]]]
    description: str = ""
    options: type | None = None
    option_prefix: str = ""
