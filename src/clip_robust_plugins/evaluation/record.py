"""The results JSON of one run (one seed): clip_benchmark's keys plus a ``robust`` block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..datasets.bad_samples import skipped_summary

if TYPE_CHECKING:  # pragma: no cover
    from ..results import MethodResult

#: clip_benchmark's own top-level metric keys, taken from the baseline
FLAT_KEYS = ("acc1", "acc5", "mean_per_class_recall")


def flat_metrics(results: list[MethodResult]) -> dict[str, float | str]:
    """clip_benchmark's keys (the baseline's) and every method's metrics as ``<method>/<key>``."""
    flat: dict[str, float | str] = {k: results[0].metrics[k] for k in FLAT_KEYS if k in results[0].metrics}
    for res in results:
        flat.update({f"{res.name}/{k}": v for k, v in res.metrics.items()})
    return flat


def results_dump(run: Any, ctx: Any, results: list[MethodResult], seed: int, processes: int) -> dict:
    """The JSON of one run: ``run`` is the engine's plan, ``ctx`` its run context."""
    args, extractor = run.args, ctx.extractor
    dump = {
        "dataset": args.dataset,
        "model": args.model,
        "pretrained": args.pretrained,
        "task": "zeroshot_classification",
        "metrics": flat_metrics(results),
        "language": args.language,
        "robust": {
            "split": run.eval_split,
            "seed": seed,
            "amp": bool(args.amp),  # torch.autocast on (--amp, CUDA's default) or fp32 (a CPU's default)
            "baseline": run.baseline.name,
            "methods": {r.name: r.info for r in results},
            "groups": run.dataset.schema.group_names(),
            "dataset_source": run.dataset.describe(),
            **({"note": run.note} if run.note else {}),
            "feature_cache_dir": str(extractor.cache.directory) if extractor.cache.directory else None,
            "feature_cache": ctx.cache_paths(),
            "zeroshot_head_cache": ctx.head_cache_path,
            "model_loaded": ctx.model_loaded,
            "processes": processes,
            "features_extracted": extractor.extracted,
            **(
                {"skipped_samples": {k: skipped_summary(v) for k, v in extractor.skipped_samples.items()}}
                if args.skip_bad_samples
                else {}
            ),
        },
    }
    if args.dump_classnames:
        dump["classnames"] = list(run.classnames)
    if args.dump_templates:
        dump["templates"] = run.templates
    return dump
