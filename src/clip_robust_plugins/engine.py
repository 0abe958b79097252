"""The evaluation engine: dataset -> features -> mitigations -> metrics -> results.

It knows nothing about any particular dataset, metric or mitigation: all of them come
from the registry it is handed.  A mitigation's declared :class:`~clip_robust_plugins.specs.Needs`
(and its ``check`` / ``feature_plan``) is all the engine reads about it.

A run is six stages, in this order (each a function below):

1. :func:`plan`: which methods, states, dataset, splits, names and seeds; reads no image;
2. :func:`check`: every method created (once per seed) and its preconditions checked;
3. :func:`extract`: one feature pass per split with every kind any method declared;
4. :func:`fit`: each method fitted, or its saved state loaded (per seed);
5. :func:`score`: its predictions on the evaluated split and every metric;
6. :func:`assemble`: the results JSON and the intervals of one seed.

Any exception from plugin code becomes one line naming the plugin, the method or dataset and
the stage (:func:`~clip_robust_plugins.errors.stage`).  :func:`evaluate` returns an
:class:`~clip_robust_plugins.results.EvalResult`; printing and writing are the CLI's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import states
from .argtypes import spec_config
from .datasets.base import DatasetError, RobustDataset
from .datasets.plain_wds import ClassOnlyShards
from .datasets.sources import is_remote_root
from .datasets.wds import GroupedShards, has_groups
from .errors import EvalError, stage
from .evaluation.context import build_context, custom_names
from .evaluation.record import results_dump
from .evaluation.routing import (
    ROBUST_PREFIX,
    WDS_PREFIX,
    check_clip_benchmark_run,
    check_seed_template,
    is_class_only_wds,
    is_group_dataset,
    is_ours,
    output_path,
    resolve_root,
    seeds,
)
from .intervals import add_intervals, interval_config
from .plugins import PluginError, Registry
from .results import EvalResult, MethodResult
from .specs import DatasetRequest, MitigationSpec, Predictions

if TYPE_CHECKING:  # pragma: no cover
    from .mitigations.base import MethodContext, Mitigation, RunContext

__all__ = [
    "ROBUST_PREFIX", "WDS_PREFIX", "RunPlan", "assemble", "baseline_spec", "build_context", "check",
    "check_clip_benchmark_run", "check_seed_template", "evaluate", "evaluate_seeds", "extract", "fit", "is_class_only_wds",
    "is_group_dataset", "is_ours", "load_dataset", "output_path", "plan", "resolve_root", "run", "run_seeds", "score", "seeds",
]


def load_dataset(args: argparse.Namespace, registry: Registry) -> RobustDataset:
    """The dataset of ``--dataset``: a registered reader (``robust/<name>``) or our shard readers."""
    root = resolve_root(args)
    if args.dataset.startswith(ROBUST_PREFIX):
        spec = registry.dataset(args.dataset[len(ROBUST_PREFIX):])
        if args.shard_pattern is not None:
            raise EvalError(f"--shard_pattern applies to wds/<name> datasets, not to {args.dataset}")
        config = spec_config(spec, args)
        with stage(dataset_label(args, registry), "load"):
            return spec.load(DatasetRequest(root=root, options=args, config=config))
    if is_remote_root(root) or args.shard_pattern is not None or has_groups(root):
        return GroupedShards(root, shard_pattern=args.shard_pattern, allow_pipe_urls=args.allow_pipe_urls)
    return ClassOnlyShards(root)


def dataset_label(args: argparse.Namespace, registry: Registry) -> str:
    """``dataset 'robust/x' (plugin 'p')``: how an error names the dataset and who registered it."""
    if args.dataset.startswith(ROBUST_PREFIX):
        owner = registry.owners.get(("datasets", args.dataset[len(ROBUST_PREFIX):]), "?")
        return f"dataset {args.dataset!r} (plugin {owner!r})"
    return f"dataset {args.dataset!r}"


def method_label(registry: Registry, spec: MitigationSpec) -> str:
    return f"mitigation {spec.name!r} (plugin {registry.owner('mitigations', spec.name)!r})"


def baseline_spec(registry: Registry) -> MitigationSpec:
    """The registered method marked ``baseline`` (zero-shot), evaluated first in every run."""
    marked = [spec for spec in registry.mitigations.values() if spec.baseline]
    if len(marked) != 1:
        raise PluginError(f"exactly one mitigation must be marked baseline; found {[s.name for s in marked] or 'none'}")
    return marked[0]


# --------------------------------------------------------------------------- 1. plan


@dataclass
class RunPlan:
    """What one ``eval`` run will do, settled before any image is read."""

    args: argparse.Namespace
    registry: Registry
    baseline: MitigationSpec
    specs: list[MitigationSpec]
    saved: dict  # method -> states.LoadedState
    dataset: RobustDataset
    eval_split: str
    classnames: list[str]
    templates: Any
    seeds: list[int]
    note: str | None = None
    #: the options each seed's methods see: ``args`` with ``seed`` set to that one seed
    seed_args: dict[int, argparse.Namespace] = field(default_factory=dict)

    @property
    def provenance(self) -> dict:
        return {"model": self.args.model, "pretrained": self.args.pretrained, "classnames": list(self.classnames)}


def plan(args: argparse.Namespace, registry: Registry) -> RunPlan:
    """Methods, saved states, dataset, splits, class names and seeds; every mistake here is one line."""
    from .mitigations.named_sets import NAMED_SETS, expand_named_sets

    baseline = baseline_spec(registry)
    requested = list(dict.fromkeys(args.mitigation or []))
    methods, specs = _method_specs(registry, baseline, [m for m in requested if m not in NAMED_SETS])
    loader = registry.model_loader(args.model_type)  # an unknown --model_type fails here, before any work
    if loader.check is not None:  # a wrong model name or --pretrained tag: one line, before the dataset is read
        loader.check(args.model, args.pretrained, registry=registry)
    dataset = load_dataset(args, registry)
    if any(m in NAMED_SETS for m in requested):  # e.g. all_baselines: every method whose labels this dataset has
        expanded, skipped = expand_named_sets(requested, registry, dataset)
        methods, specs = _method_specs(registry, baseline, expanded)
        for name, reason in skipped.items():
            print(f"note: {', '.join(n for n in requested if n in NAMED_SETS)} leaves out {name}: {reason}", file=sys.stderr)
    saved = states.read_states(args.mitigation_state)
    unused = sorted(set(saved) - set(methods))
    if unused:
        raise EvalError(f"{saved[unused[0]].path}: state for {unused[0]!r}, which is not among --mitigation {methods[1:]}")
    note = _group_label_note(args, dataset, specs, saved)
    with stage(dataset_label(args, registry), "splits"):
        splits = dataset.splits()
    _check_splits(args, specs, saved, splits)
    classnames = custom_names(args.custom_classname_file, args.dataset) or dataset.classnames
    templates = custom_names(args.custom_template_file, args.dataset) or dataset.templates
    if len(classnames) != len(dataset.schema.classnames):
        raise EvalError(f"{len(classnames)} class names given for {len(dataset.schema.classnames)} classes")
    if not templates:
        raise EvalError(f"{args.dataset}: no prompt templates (zeroshot_classification_templates.txt or --custom_template_file)")
    run = RunPlan(args, registry, baseline, specs, saved, dataset, args.split, list(classnames), templates,
                  seeds(args.seed), note=note)
    for seed in run.seeds:
        run.seed_args[seed] = copy.copy(args)
        run.seed_args[seed].seed = seed
    return run


def _method_specs(registry: Registry, baseline: MitigationSpec, names: list[str]) -> tuple[list[str], list[MitigationSpec]]:
    """The baseline first, then ``names`` in order; an unknown name is one line."""
    methods = [baseline.name] + [m for m in names if m != baseline.name]
    try:
        return methods, [registry.mitigation(m) for m in methods]
    except PluginError as exc:
        raise EvalError(str(exc)) from None


def _group_label_note(args: argparse.Namespace, dataset: RobustDataset, specs: list[MitigationSpec],
                      saved: dict) -> str | None:
    """Without group metadata, groups are the classes: say so, and refuse methods that need groups."""
    if dataset.has_group_labels:
        return None
    needy = [spec.name for spec in specs if "group" in spec.needs.labels and spec.name not in saved]
    if needy:
        raise EvalError(f"{needy[0]} needs group labels, but {args.dataset} has no group metadata (no groups.json)")
    note = f"{args.dataset}: no group metadata (no groups.json); groups are the classes, metrics are class-level"
    print(f"note: {note}", file=sys.stderr)
    return note


def _check_splits(args: argparse.Namespace, specs: list[MitigationSpec], saved: dict, splits: Sequence[str]) -> None:
    if args.split not in splits:
        raise EvalError(f"{args.dataset} has no split {args.split!r} (splits: {list(splits)})")
    for spec in specs:
        for split in (args.split, *(() if spec.name in saved else spec.needs.fit_splits)):
            if split not in splits:
                raise EvalError(f"{spec.name}: needs split {split!r}, but {args.dataset} has {list(splits)}")


# --------------------------------------------------------------------------- 2. check


@dataclass
class Checked:
    """The run context and every seed's unfitted methods, preconditions checked."""

    ctx: RunContext
    methods: dict[int, dict[str, Mitigation]]  # seed -> method name -> mitigation
    #: seed -> method name -> the run as that method sees it (its declared splits and labels)
    views: dict[int, dict[str, MethodContext]]
    dist: Any = None  # distributed.DistInfo under torchrun


def use_seed(run: RunPlan, ctx: RunContext, seed: int) -> None:
    """Point the shared context at one seed (``ctx.seed``); features stay shared."""
    ctx.seed = seed


def _create(spec: MitigationSpec, args: argparse.Namespace, label: str) -> Mitigation:
    config = spec_config(spec, args)
    with stage(label, "create"):
        return spec.create(config)


def check(run: RunPlan) -> Checked:
    """Create every method (one per seed) and run its ``check``, before the model is built or
    any feature extracted; build the model now when a method runs it itself."""
    from . import distributed

    args = run.args
    dist = distributed.from_env(args.device)  # torchrun: this rank extracts its share
    if dist is not None:
        args.device = dist.device
        for seed_args in run.seed_args.values():
            seed_args.device = dist.device
    ctx = build_context(args, run.registry, run.dataset, run.eval_split, run.classnames, run.templates)
    methods: dict[int, dict[str, Mitigation]] = {}
    views: dict[int, dict[str, MethodContext]] = {}
    for seed in run.seeds:
        use_seed(run, ctx, seed)
        methods[seed], views[seed] = {}, {}
        for spec in run.specs:
            label = method_label(run.registry, spec)
            methods[seed][spec.name] = mitigation = _create(spec, run.seed_args[seed], label)
            views[seed][spec.name] = view = ctx.for_method(spec.name, spec.needs)  # each sees what it declared
            with stage(label, "check"):
                mitigation.check(view)
    if any(spec.needs.live_model and spec.name not in run.saved for spec in run.specs):
        ctx.model  # noqa: B018 - a method runs the model itself: build it now, before the passes
    return Checked(ctx, methods, views, dist)


# --------------------------------------------------------------------------- 3. extract


def feature_plan(run: RunPlan, checked: Checked) -> dict[str, list]:
    """Every feature kind of every split any method (of any seed) reads, so each split is read once."""
    from .features import kind_name

    feature_passes: dict[str, list] = {run.eval_split: ["image"]}

    def add(split: str, kinds) -> None:
        have = feature_passes.setdefault(split, [])
        names = {kind_name(k) for k in have}
        have.extend(k for k in kinds if kind_name(k) not in names)

    for seed, methods in checked.methods.items():
        use_seed(run, checked.ctx, seed)
        for spec in run.specs:
            fitting = spec.name not in run.saved
            for split in (run.eval_split, *(spec.needs.fit_splits if fitting else ())):
                add(split, spec.needs.feature_kinds)
            with stage(method_label(run.registry, spec), "feature_plan"):
                planned = methods[spec.name].feature_plan(checked.views[seed][spec.name], fitting)
            for split, kinds in planned.items():
                add(split, kinds)
    return feature_passes


def extract(run: RunPlan, checked: Checked) -> bool:
    """One pass per split with every planned kind.  Under torchrun every rank extracts its share
    and only rank 0 goes on: False on the other ranks."""
    ctx, dist = checked.ctx, checked.dist
    extractor = ctx.extractor
    passes = feature_plan(run, checked)
    extractor.dist = dist
    for split, kinds in passes.items():
        if not kinds:  # nothing to extract (a method that reads images itself): no collective either
            continue
        with stage(dataset_label(run.args, run.registry), f"extract (split {split!r})"):
            if dist is None or dist.is_main:
                ctx.prefetch(split, kinds)
            else:
                extractor.extract(run.dataset, run.args.dataset, split, kinds)
    if dist is not None:
        # Rank 0 holds every planned feature; anything a method asks for later it extracts alone.
        extractor.dist = None
        if not dist.is_main:  # data-parallel fits (fine-tuning) need every rank; rank 0 reports
            for seed, methods in checked.methods.items():
                use_seed(run, ctx, seed)
                for spec in run.specs:
                    if getattr(methods[spec.name], "data_parallel", False) and spec.name not in run.saved:
                        fit(run, checked.views[seed][spec.name], spec, methods[spec.name])
        return dist.is_main
    return True


# --------------------------------------------------------------------------- 4. fit


def fit(run: RunPlan, ctx: RunContext, spec: MitigationSpec, mitigation: Mitigation) -> tuple[Any, float]:
    """Fit ``mitigation``, or load its saved state; returns (the loaded state or None, seconds)."""
    label = method_label(run.registry, spec)
    loaded = run.saved.get(spec.name)
    t0 = time.perf_counter()
    if loaded is not None:
        states.check_compatible(loaded, run.provenance)
        with stage(label, "load_state_dict"):
            mitigation.load_state_dict(loaded.tensors)
    else:
        with stage(label, "fit"):
            mitigation.fit(ctx)
    return loaded, time.perf_counter() - t0


# --------------------------------------------------------------------------- 5. score


def predict(run: RunPlan, ctx: RunContext, view: MethodContext, spec: MitigationSpec, mitigation: Mitigation):
    """The method's logits on the evaluated split (predicted through its ``view``), checked for
    shape and finiteness."""
    label = method_label(run.registry, spec)
    with stage(label, "predict"):
        logits = mitigation.predict(view, run.eval_split).float().cpu()
    eval_fs = ctx.features(run.eval_split)
    if logits.shape != (len(eval_fs), ctx.n_classes):
        raise EvalError(f"{label} returned logits of shape {tuple(logits.shape)}, expected {(len(eval_fs), ctx.n_classes)}")
    if not bool(logits.isfinite().all()):
        row = int((~logits.isfinite().all(dim=1)).nonzero()[0])
        raise EvalError(
            f"{label} returned non-finite logits "
            f"(first at sample {eval_fs.keys[row]!r} of split {run.eval_split!r}); no results written"
        )
    return logits


def metrics_of(run: RunPlan, ctx: RunContext, preds: Predictions, mitigation: Mitigation) -> dict[str, float | str]:
    """Every registered metric on one method's predictions (keys unique across metrics)."""
    metrics: dict[str, float | str] = {}
    for metric in run.registry.metrics.values():
        kwargs = {"ctx": ctx, "mitigation": mitigation} if metric.takes_context else {}
        if metric.options is not None:
            kwargs["config"] = spec_config(metric, run.seed_args[ctx.seed])
        label = f"metric {metric.name!r} (plugin {run.registry.owners.get(('metrics', metric.name), '?')!r})"
        with stage(label, f"score (mitigation {preds.method!r})"):
            values = metric.compute(preds, **kwargs)
        for key, value in values.items():
            if key in metrics:
                raise PluginError(f"metric key {key!r} produced twice (second time by metric {metric.name!r})")
            metrics[key] = value
    return metrics


def score(run: RunPlan, ctx: RunContext, view: MethodContext, spec: MitigationSpec, mitigation: Mitigation,
          loaded: Any, fit_seconds: float) -> MethodResult:
    """Predict, compute every metric, and record what the method did (and which labels it read)."""
    t1 = time.perf_counter()
    logits = predict(run, ctx, view, spec, mitigation)
    predict_seconds = time.perf_counter() - t1
    eval_fs = ctx.features(run.eval_split)
    pred = logits.argmax(dim=1).numpy()
    preds = Predictions(spec.name, run.eval_split, eval_fs.keys, pred, eval_fs.fields.numpy(), run.dataset.schema,
                        logits.numpy())
    metrics = metrics_of(run, ctx, preds, mitigation)
    label = method_label(run.registry, spec)
    with stage(label, "state_dict"):
        info = {
            "plugin": run.registry.owner("mitigations", spec.name),
            "needs": spec.needs.to_json(),
            "labels_used": view.labels_used() if loaded is None else None,  # None: fitted in another run
            # what the run asked of it: its typed config (None: it declares no options)
            "settings": dataclasses.asdict(config) if (config := spec_config(spec, run.args)) is not None else None,
            "hyperparameters": mitigation.hyperparameters(),
            "fit_seconds": round(fit_seconds, 4),
            "state_loaded_from": loaded.path if loaded is not None else None,
            "predict_seconds": round(predict_seconds, 4),
        }
        state = {k: v for k, v in mitigation.state_dict().items() if v is not None}
    return MethodResult(spec.name, logits, pred, metrics, info, state)


# --------------------------------------------------------------------------- 6. assemble


def assemble(run: RunPlan, checked: Checked, results: list[MethodResult], seed: int) -> EvalResult:
    """One seed's :class:`EvalResult`: the results JSON, the methods' figures and the intervals."""
    ctx, schema = checked.ctx, run.dataset.schema
    eval_fs = ctx.features(run.eval_split)
    extra_files: list = []
    if run.args.plot:
        for spec in run.specs:
            with stage(method_label(run.registry, spec), "plots"):
                figures = checked.methods[seed][spec.name].plots()
            extra_files += [(f"_{spec.name}_{name}.png", writer) for name, writer in figures.items()]
    processes = checked.dist.world_size if checked.dist is not None else 1
    result = EvalResult(
        dump=results_dump(run, ctx, results, seed, processes),
        keys=eval_fs.keys,
        y=eval_fs.y.numpy(),
        group_names=schema.group_names(),
        groups=schema.group_ids(eval_fs.fields.numpy()),
        methods=results,
        provenance={**run.provenance, "dataset": run.args.dataset},
        extra_files=extra_files,
    )
    intervals = interval_config(run.args)
    add_intervals(result, intervals.bootstrap_samples, intervals.ci_level, seed, schema.counts("train"))
    return result


# --------------------------------------------------------------------------- the entry points


def evaluate_seeds(args: argparse.Namespace, registry: Registry) -> list[EvalResult] | None:
    """Run the baseline and every requested mitigation on ``args.split``, once per ``--seed``
    value, on features extracted once; one :class:`EvalResult` per seed, in order.

    Every precondition is checked before the model is built or a feature extracted.  Under
    torchrun, every rank extracts its share of the features and only rank 0 goes on (fits,
    predicts, scores); the other ranks return None.
    """
    run = plan(args, registry)
    checked = check(run)
    if not extract(run, checked):
        return None
    out = []
    for seed in run.seeds:
        use_seed(run, checked.ctx, seed)
        methods, views = checked.methods[seed], checked.views[seed]
        results = [score(run, checked.ctx, views[spec.name], spec, methods[spec.name],
                         *fit(run, views[spec.name], spec, methods[spec.name]))
                   for spec in run.specs]
        out.append(assemble(run, checked, results, seed))
    return out


def evaluate(args: argparse.Namespace, registry: Registry) -> EvalResult | None:
    """:func:`evaluate_seeds` for a run of one seed (None on a torchrun worker rank)."""
    if len(seeds(args.seed)) != 1:
        raise EvalError(f"evaluate() runs one seed; got {args.seed} (use evaluate_seeds)")
    results = evaluate_seeds(args, registry)
    return None if results is None else results[0]


def run_seeds(args: argparse.Namespace, registry: Registry) -> list[EvalResult] | None:
    """:func:`evaluate_seeds` with every user error as :class:`EvalError` (one line)."""
    from . import distributed

    try:
        return evaluate_seeds(args, registry)
    except (DatasetError, PluginError, states.StateError) as exc:
        raise EvalError(str(exc)) from None
    finally:
        distributed.close_default()


def run(args: argparse.Namespace, registry: Registry) -> EvalResult | None:
    """Evaluate one clip_benchmark-style run (one seed) on a group dataset; user errors become EvalError."""
    if len(seeds(args.seed)) != 1:
        raise EvalError(f"run() evaluates one seed; got {args.seed} (use run_seeds)")
    results = run_seeds(args, registry)
    return None if results is None else results[0]
