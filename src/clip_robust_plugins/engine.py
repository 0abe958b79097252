"""The evaluation engine: dataset -> features -> mitigations -> metrics -> results.

It knows nothing about any particular dataset, metric or mitigation: all of them come
from the registry it is handed.  A mitigation's declared :class:`~clip_robust_plugins.records.Needs`
(and its ``check`` / ``feature_plan``) is all the engine reads about it.  It returns an
:class:`~clip_robust_plugins.results.EvalResult`; printing and writing are the CLI's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import states
from .argtypes import spec_config
from .datasets.bad_samples import skipped_summary
from .datasets.base import DatasetError, RobustDataset
from .datasets.plain_wds import ClassOnlyShards, is_class_only_root
from .datasets.sources import is_remote_root
from .datasets.wds import GroupedShards, has_groups
from .errors import EvalError
from .intervals import add_intervals, interval_config
from .plugins import PluginError, Registry
from .records import DatasetRequest, MitigationSpec, Predictions
from .results import EvalResult, MethodResult

if TYPE_CHECKING:  # pragma: no cover
    from .mitigations.base import RunContext

ROBUST_PREFIX = "robust/"
WDS_PREFIX = "wds/"


def is_group_dataset(dataset: str, root: str) -> bool:
    """True for ``robust/<name>``, for ``wds/<name>`` whose local root has groups.json, and for
    every ``wds/`` root that is a URL or ``pipe:``: those never go to clip_benchmark, whose
    reader runs ``curl`` on them through a shell (our reader fetches groups.json, once)."""
    if dataset.startswith(ROBUST_PREFIX):
        return True
    return dataset.startswith(WDS_PREFIX) and (is_remote_root(root) or has_groups(root))


def is_class_only_wds(dataset: str, root: str) -> bool:
    """``wds/<name>`` whose local root is clip_benchmark's own classification shards (no groups.json)."""
    return dataset.startswith(WDS_PREFIX) and is_class_only_root(root)


def is_ours(args: argparse.Namespace) -> bool:
    """Whether this run goes to our engine: a group dataset, or a zero-shot run on
    clip_benchmark's own local classification shards (class-level metrics)."""
    root = resolve_root(args)
    zeroshot = args.task in ("auto", "zeroshot_classification")
    if is_group_dataset(args.dataset, root) or (zeroshot and is_class_only_wds(args.dataset, root)):
        if not zeroshot:
            raise EvalError(
                f"{args.dataset}: task {args.task!r} is not available on group datasets here; "
                "use zeroshot_classification (with --mitigation)"
            )
        return True
    return False


def check_clip_benchmark_run(args: argparse.Namespace) -> None:
    """A run that goes to clip_benchmark must not carry flags only our engine reads."""
    if args.mitigation:
        raise EvalError(
            f"--mitigation needs a group dataset (robust/<name>, or wds/<name> whose root has groups.json); "
            f"{args.dataset} at {resolve_root(args)!r} has none"
        )
    ours = [flag for flag, on in (("--shard_pattern", args.shard_pattern is not None),
                                  ("--allow_pipe_urls", args.allow_pipe_urls),
                                  ("--skip_bad_samples", args.skip_bad_samples)) if on]
    if ours:
        raise EvalError(f"{ours[0]} applies to datasets our engine reads; {args.dataset} runs through clip_benchmark")


def resolve_root(args: argparse.Namespace) -> str:
    """clip_benchmark's ``--dataset_root`` templating (``{dataset}``, ``{dataset_cleaned}``)."""
    name = args.dataset.split("/", 1)[1] if args.dataset.startswith(WDS_PREFIX) else args.dataset
    return args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))


def load_dataset(args: argparse.Namespace, registry: Registry) -> RobustDataset:
    root = resolve_root(args)
    if args.dataset.startswith(ROBUST_PREFIX):
        spec = registry.dataset(args.dataset[len(ROBUST_PREFIX):])
        if args.shard_pattern is not None:
            raise EvalError(f"--shard_pattern applies to wds/<name> datasets, not to {args.dataset}")
        return spec.load(DatasetRequest(root=root, options=args, config=spec_config(spec, args)))
    if is_remote_root(root) or args.shard_pattern is not None or has_groups(root):
        return GroupedShards(root, shard_pattern=args.shard_pattern, allow_pipe_urls=args.allow_pipe_urls)
    return ClassOnlyShards(root)


def _custom_names(path: str | None, dataset: str) -> Any:
    """clip_benchmark's --custom_classname_file / --custom_template_file lookup."""
    if not path:
        return None
    import json

    with open(path) as fh:
        table = json.load(fh)
    short = dataset.split("/", 1)[1]
    for key in (dataset, short):
        if key in table:
            return table[key]
    return None


def baseline_spec(registry: Registry) -> MitigationSpec:
    """The registered method marked ``baseline`` (zero-shot), evaluated first in every run."""
    marked = [spec for spec in registry.mitigations.values() if spec.baseline]
    if len(marked) != 1:
        raise PluginError(f"exactly one mitigation must be marked baseline; found {[s.name for s in marked] or 'none'}")
    return marked[0]


def build_context(args: argparse.Namespace, registry: Registry, dataset: RobustDataset, split: str,
                  classnames: Sequence[str] | None = None, templates: Any = None) -> RunContext:
    """The run context of ``eval`` (and of commands that read a dataset the same way, such as
    ``discover``): the dataset, a feature extractor over the cache, and a model built on first use."""
    from .features import FeatureCache, FeatureExtractor, default_cache_dir
    from .mitigations.base import RunContext

    spec = registry.model_loader(args.model_type)

    def load_model():
        model, transform, tokenizer = spec.bind(registry)(
            model_name=args.model, pretrained=args.pretrained, cache_dir=args.model_cache_dir, device=args.device
        )
        model.eval()
        return model, transform, tokenizer

    ctx: RunContext | None = None
    cache_dir = None if args.no_feature_cache else (args.feature_cache or default_cache_dir())
    progress = bool(getattr(args, "verbose", True))
    extractor = FeatureExtractor(
        load_model=lambda: (ctx.model, ctx.transform),
        registry=registry,
        model_type=args.model_type,
        model_name=args.model,
        pretrained=args.pretrained,
        device=args.device,
        amp=args.amp,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        cache=FeatureCache(cache_dir),
        progress=progress,
        skip_bad_samples=args.skip_bad_samples,
    )
    ctx = RunContext(
        dataset=dataset,
        dataset_name=args.dataset,
        classnames=classnames or dataset.classnames,
        templates=templates or dataset.templates,
        load_model=load_model,
        extractor=extractor,
        registry=registry,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
        options=args,
        eval_split=split,
        progress=progress,
    )
    return ctx


def _plan(ctx, mitigations: dict, specs: list[MitigationSpec], saved: dict, eval_split: str) -> dict[str, list]:
    """Every feature kind of every split any method reads, so each split is read once."""
    from .features import kind_name

    plan: dict[str, list] = {eval_split: ["image"]}

    def add(split: str, kinds) -> None:
        have = plan.setdefault(split, [])
        names = {kind_name(k) for k in have}
        have.extend(k for k in kinds if kind_name(k) not in names)

    for spec in specs:
        fitting = spec.name not in saved
        for split in (eval_split, *(spec.needs.fit_splits if fitting else ())):
            add(split, spec.needs.feature_kinds)
        for split, kinds in mitigations[spec.name].feature_plan(ctx, fitting).items():
            add(split, kinds)
    return plan


def evaluate(args: argparse.Namespace, registry: Registry) -> EvalResult | None:
    """Run the baseline and every requested mitigation on ``args.split``; compute all metrics.

    Every precondition is checked before the model is built or a feature extracted.  Under
    torchrun, every rank extracts its share of the features and only rank 0 goes on (fits,
    predicts, scores); the other ranks return None.
    """
    from . import distributed

    baseline = baseline_spec(registry)
    methods = [baseline.name] + [m for m in dict.fromkeys(args.mitigation or []) if m != baseline.name]
    try:
        specs = [registry.mitigation(m) for m in methods]
    except PluginError as exc:
        raise EvalError(str(exc)) from None
    saved = states.read_states(args.mitigation_state)
    unused = sorted(set(saved) - set(methods))
    if unused:
        raise EvalError(f"{saved[unused[0]].path}: state for {unused[0]!r}, which is not among --mitigation {methods[1:]}")
    dataset = load_dataset(args, registry)
    note = None
    if not getattr(dataset, "has_group_labels", True):
        needy = [spec.name for spec in specs if "group" in spec.needs.labels and spec.name not in saved]
        if needy:
            raise EvalError(f"{needy[0]} needs group labels, but {args.dataset} has no group metadata (no groups.json)")
        note = f"{args.dataset}: no group metadata (no groups.json); groups are the classes, metrics are class-level"
        print(f"note: {note}", file=sys.stderr)

    eval_split = args.split
    splits = dataset.splits()
    if eval_split not in splits:
        raise EvalError(f"{args.dataset} has no split {eval_split!r} (splits: {list(splits)})")
    for spec in specs:
        for split in (eval_split, *(() if spec.name in saved else spec.needs.fit_splits)):
            if split not in splits:
                raise EvalError(f"{spec.name}: needs split {split!r}, but {args.dataset} has {list(splits)}")

    classnames = _custom_names(args.custom_classname_file, args.dataset) or dataset.classnames
    templates = _custom_names(args.custom_template_file, args.dataset) or dataset.templates
    if len(classnames) != len(dataset.schema.classnames):
        raise EvalError(f"{len(classnames)} class names given for {len(dataset.schema.classnames)} classes")
    if not templates:
        raise EvalError(f"{args.dataset}: no prompt templates (zeroshot_classification_templates.txt or --custom_template_file)")
    registry.model_loader(args.model_type)  # an unknown --model_type fails here, before any work

    dist = distributed.from_env(args.device)  # torchrun: this rank extracts its share
    if dist is not None:
        args.device = dist.device
    ctx = build_context(args, registry, dataset, eval_split, classnames, templates)
    extractor = ctx.extractor
    mitigations = {spec.name: spec.create(spec_config(spec, args) if spec.options else args) for spec in specs}
    for spec in specs:  # preconditions, before the model is built or any feature extracted
        try:
            mitigations[spec.name].check(ctx)
        except (ValueError, KeyError, DatasetError, PluginError) as exc:
            raise EvalError(f"{spec.name}: {exc}") from None
    if any(spec.needs.live_model and spec.name not in saved for spec in specs):
        ctx.model  # noqa: B018 - a method runs the model itself: build it now, before the passes
    # One pass per split with every feature kind any method declared for it.
    plan = _plan(ctx, mitigations, specs, saved, eval_split)
    extractor.dist = dist
    for split, kinds in plan.items():
        if dist is None or dist.is_main:
            ctx.prefetch(split, kinds)
        else:
            extractor.extract(dataset, args.dataset, split, kinds)
    if dist is not None:
        # Rank 0 holds every planned feature; anything a method asks for later it extracts alone.
        extractor.dist = None
        if not dist.is_main:
            return None

    eval_fs = ctx.features(eval_split)
    schema = dataset.schema
    fields = eval_fs.fields.numpy()
    provenance = {"model": args.model, "pretrained": args.pretrained, "classnames": list(classnames)}
    results: list[MethodResult] = []
    extra_files: list = []
    for spec in specs:
        mitigation = mitigations[spec.name]
        t0 = time.perf_counter()
        loaded = saved.get(spec.name)
        if loaded is not None:
            states.check_compatible(loaded, provenance)
            mitigation.load_state_dict(loaded.tensors)
        else:
            mitigation.fit(ctx)
        t1 = time.perf_counter()
        logits = mitigation.predict(ctx, eval_split).float().cpu()
        t2 = time.perf_counter()
        owner = registry.owner("mitigations", spec.name)
        if logits.shape != (len(eval_fs), ctx.n_classes):
            raise EvalError(
                f"mitigation {spec.name!r} (plugin {owner!r}) returned logits of "
                f"shape {tuple(logits.shape)}, expected {(len(eval_fs), ctx.n_classes)}"
            )
        if not bool(logits.isfinite().all()):
            row = int((~logits.isfinite().all(dim=1)).nonzero()[0])
            raise EvalError(
                f"mitigation {spec.name!r} (plugin {owner!r}) returned non-finite logits "
                f"(first at sample {eval_fs.keys[row]!r} of split {eval_split!r}); no results written"
            )
        pred = logits.argmax(dim=1).numpy()
        preds = Predictions(spec.name, eval_split, eval_fs.keys, pred, fields, schema, logits.numpy())
        metrics: dict[str, float | str] = {}
        for metric in registry.metrics.values():
            kwargs = {"ctx": ctx, "mitigation": mitigation} if metric.takes_context else {}
            if metric.options is not None:
                kwargs["config"] = spec_config(metric, args)
            values = metric.compute(preds, **kwargs)
            for key, value in values.items():
                if key in metrics:
                    raise PluginError(f"metric key {key!r} produced twice (second time by metric {metric.name!r})")
                metrics[key] = value
        info = {
            "plugin": owner,
            "needs": spec.needs.to_json(),
            "settings": dataclasses.asdict(config) if (config := spec_config(spec, args)) is not None else None,
            "hyperparameters": mitigation.hyperparameters(),
            "fit_seconds": round(t1 - t0, 4),
            "state_loaded_from": loaded.path if loaded is not None else None,
            "predict_seconds": round(t2 - t1, 4),
        }
        state = {k: v for k, v in mitigation.state_dict().items() if v is not None}
        results.append(MethodResult(spec.name, logits, pred, metrics, info, state))
        if args.plot:
            extra_files += [(f"_{spec.name}_{name}.png", writer) for name, writer in mitigation.plots().items()]

    flat: dict[str, float | str] = {}
    first = results[0]
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        if key in first.metrics:
            flat[key] = first.metrics[key]
    for res in results:
        flat.update({f"{res.name}/{k}": v for k, v in res.metrics.items()})
    dump = {
        "dataset": args.dataset,
        "model": args.model,
        "pretrained": args.pretrained,
        "task": "zeroshot_classification",
        "metrics": flat,
        "language": args.language,
        "robust": {
            "split": eval_split,
            "seed": args.seed,
            "baseline": baseline.name,
            "methods": {r.name: r.info for r in results},
            "groups": schema.group_names(),
            "dataset_source": dataset.describe(),
            **({"note": note} if note else {}),
            "feature_cache_dir": str(ctx.extractor.cache.directory) if ctx.extractor.cache.directory else None,
            "feature_cache": ctx.cache_paths(),
            "zeroshot_head_cache": ctx.head_cache_path,
            "model_loaded": ctx.model_loaded,
            "processes": dist.world_size if dist is not None else 1,
            "features_extracted": extractor.extracted,
            **(
                {"skipped_samples": {k: skipped_summary(v) for k, v in extractor.skipped_samples.items()}}
                if args.skip_bad_samples
                else {}
            ),
        },
    }
    if args.dump_classnames:
        dump["classnames"] = list(classnames)
    if args.dump_templates:
        dump["templates"] = templates
    result = EvalResult(
        dump=dump,
        keys=eval_fs.keys,
        y=eval_fs.y.numpy(),
        group_names=schema.group_names(),
        groups=schema.group_ids(fields),
        methods=results,
        provenance={**provenance, "dataset": args.dataset},
        extra_files=extra_files,
    )
    intervals = interval_config(args)
    add_intervals(result, intervals.bootstrap_samples, intervals.ci_level, args.seed, schema.counts("train"))
    return result


def output_path(args: argparse.Namespace, task: str = "zeroshot_classification") -> str:
    """The results path from clip_benchmark's ``--output`` template, filled as it fills it."""
    dataset_name = args.dataset.split("/", 1)[1] if args.dataset.startswith(WDS_PREFIX) else args.dataset
    is_file = os.path.isfile(args.pretrained)
    return args.output.format(
        model=args.model,
        pretrained=os.path.basename(args.pretrained) if is_file else args.pretrained,
        pretrained_full_path=args.pretrained.replace("/", "_") if is_file else args.pretrained,
        task=task,
        dataset=dataset_name.replace("/", "_"),
        language=args.language,
    )


def run(args: argparse.Namespace, registry: Registry) -> EvalResult | None:
    """Evaluate one clip_benchmark-style run on a group dataset; user errors become EvalError."""
    from . import distributed

    try:
        return evaluate(args, registry)
    except (DatasetError, PluginError, states.StateError) as exc:
        raise EvalError(str(exc)) from None
    finally:
        distributed.close_default()
