"""The evaluation engine: dataset -> features -> mitigations -> metrics -> results.

It knows nothing about any particular dataset, metric or mitigation: all of them come
from the registry, and a mitigation's declared :class:`~clip_robust_plugins.records.Needs`
is the only thing the engine reads about it (to plan feature extraction and to
record which labels each method used).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import distributed, states
from .datasets.bad_samples import skipped_summary
from .datasets.base import DatasetError, RobustDataset
from .datasets.plain_wds import ClassOnlyShards, is_class_only_root
from .datasets.sources import is_remote_root
from .datasets.wds import GroupedShards, has_groups
from .features import FeatureCache, FeatureExtractor, default_cache_dir
from .mitigations.base import RunContext
from .plugins import PluginError, Registry
from .records import DatasetRequest, Predictions

BASELINE = "zeroshot"
ROBUST_PREFIX = "robust/"
WDS_PREFIX = "wds/"


class EvalError(RuntimeError):
    """A run cannot proceed; the message says why in one line."""


@dataclass
class MethodResult:
    """One evaluated method: its predictions on the eval split and what it recorded."""

    name: str
    logits: torch.Tensor
    pred: np.ndarray
    metrics: dict[str, float | str]
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Everything a run produced, before anything is written."""

    dump: dict[str, Any]
    keys: tuple[str, ...]
    y: np.ndarray
    group_names: list[str]
    groups: np.ndarray
    methods: list[MethodResult]
    provenance: dict[str, Any] = field(default_factory=dict)


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
        return spec.load(DatasetRequest(root=root, options=args))
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


def evaluate(args: argparse.Namespace, registry: Registry) -> EvalResult | None:
    """Run zero-shot and every requested mitigation on ``args.split``; compute all metrics.

    Under torchrun, every rank extracts its share of the features and only rank 0 goes on
    (fits, predicts, scores); the other ranks return None.
    """
    methods = [BASELINE] + [m for m in dict.fromkeys(args.mitigation or []) if m != BASELINE]
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

    dist = distributed.from_env(args.device)  # torchrun: this rank extracts its share
    if dist is not None:
        args.device = dist.device
    loader = registry.model_loader(args.model_type)
    model, transform, tokenizer = loader.load(
        model_name=args.model, pretrained=args.pretrained, cache_dir=args.model_cache_dir, device=args.device
    )
    model.eval()
    cache_dir = None if args.no_feature_cache else (args.feature_cache or default_cache_dir())
    extractor = FeatureExtractor(
        model,
        transform,
        model_type=args.model_type,
        model_name=args.model,
        pretrained=args.pretrained,
        device=args.device,
        amp=args.amp,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        cache=FeatureCache(cache_dir),
        progress=args.verbose,
        skip_bad_samples=args.skip_bad_samples,
    )
    ctx = RunContext(
        dataset=dataset,
        dataset_name=args.dataset,
        classnames=classnames,
        templates=templates,
        model=model,
        tokenizer=tokenizer,
        transform=transform,
        extractor=extractor,
        device=args.device,
        amp=args.amp,
        seed=args.seed,
        options=args,
        eval_split=eval_split,
        progress=args.verbose,
    )
    # One pass per split with every feature kind any method declared for it.
    plan: dict[str, list[str]] = {eval_split: ["image"]}
    for spec in specs:
        fit_splits = () if spec.name in saved else spec.needs.fit_splits
        for split in (eval_split, *fit_splits):
            kinds = plan.setdefault(split, [])
            kinds.extend(k for k in spec.needs.feature_kinds if k not in kinds)
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
    for spec in specs:
        mitigation = spec.create(args)
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
        if logits.shape != (len(eval_fs), ctx.n_classes):
            raise EvalError(
                f"mitigation {spec.name!r} (plugin {registry.owner('mitigations', spec.name)!r}) returned logits of "
                f"shape {tuple(logits.shape)}, expected {(len(eval_fs), ctx.n_classes)}"
            )
        pred = logits.argmax(dim=1).numpy()
        preds = Predictions(spec.name, eval_split, eval_fs.keys, pred, fields, schema, logits.numpy())
        metrics: dict[str, float | str] = {}
        for metric in registry.metrics.values():
            for key, value in metric.compute(preds).items():
                if key in metrics:
                    raise PluginError(f"metric key {key!r} produced twice (second time by metric {metric.name!r})")
                metrics[key] = value
        info = {
            "plugin": registry.owner("mitigations", spec.name),
            "needs": spec.needs.to_json(),
            "hyperparameters": mitigation.hyperparameters(),
            "fit_seconds": round(t1 - t0, 4),
            "state_loaded_from": loaded.path if loaded is not None else None,
            "predict_seconds": round(t2 - t1, 4),
        }
        state = {k: v for k, v in mitigation.state_dict().items() if v is not None}
        results.append(MethodResult(spec.name, logits, pred, metrics, info, state))

    flat: dict[str, float | str] = {}
    baseline = results[0]
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        if key in baseline.metrics:
            flat[key] = baseline.metrics[key]
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
            "methods": {r.name: r.info for r in results},
            "groups": schema.group_names(),
            "dataset_source": dataset.describe(),
            **({"note": note} if note else {}),
            "feature_cache_dir": str(cache_dir) if cache_dir is not None else None,
            "feature_cache": ctx.cache_paths(),
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
    return EvalResult(
        dump=dump,
        keys=eval_fs.keys,
        y=eval_fs.y.numpy(),
        group_names=schema.group_names(),
        groups=schema.group_ids(fields),
        methods=results,
        provenance={**provenance, "dataset": args.dataset},
    )


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
    """One clip_benchmark-style run on a group dataset: evaluate, print, write atomically."""
    from . import report

    out = output_path(args)
    if os.path.exists(out) and args.skip_existing:
        if args.verbose:
            print(f"Skip {out}, exists already.")
        return None
    try:
        result = evaluate(args, registry)
    except (DatasetError, PluginError, states.StateError) as exc:
        raise EvalError(str(exc)) from None
    finally:
        distributed.close_default()
    if result is None:  # a torchrun worker rank: rank 0 reports
        return None
    print(report.format_table(result), file=sys.stdout)
    written = report.write_outputs(
        result, out, predictions=args.save_predictions, plot=args.plot, save_states=args.save_mitigation_state
    )
    if args.verbose:
        for path in written:
            print(f"Wrote {path}")
    return result
