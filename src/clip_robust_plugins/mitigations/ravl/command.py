"""``clip_benchmark_robust discover``: discovery on a split, then the JSON report and PNG sheet (atomic)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ...datasets.base import DatasetError
from ..base import RunContext
from .configs import discovery_config, region_config
from .discovery_report import build_report, format_summary, write_json
from .proposers import make_proposer
from .sheet import collect_samples, sheet_rows, write_sheet
from .split_discovery import discover


def add_discover_arguments(parser: argparse.ArgumentParser, command_ctx) -> None:
    """The ``discover`` subcommand: clip_benchmark's flag names, the datasets' flags and RaVL's discovery flags."""
    from ...argtypes import add_data_flags
    from ...plugins import add_plugin_flags
    from .configs import add_discover_flags

    parser.add_argument("--dataset", required=True, help="a group dataset: robust/<name> or wds/<name> with groups.json")
    parser.add_argument("--dataset_root", default="root", help="dataset root, clip_benchmark's templating ({dataset})")
    parser.add_argument("--model", required=True, help="open_clip model name (e.g. ViT-B-32, crp-tiny)")
    parser.add_argument("--pretrained", required=True, help="checkpoint tag or file")
    parser.add_argument("--model_type", default="open_clip", help="registered model type (default open_clip)")
    parser.add_argument("--model_cache_dir", default=None, help="where open_clip caches downloaded weights")
    parser.add_argument("--split", default="val", help="class-labelled split to analyse (default val)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="k-medoids seed (default 0)")
    parser.add_argument("--no_amp", action="store_false", dest="amp", default=True,
                        help="no mixed precision (on by default, as in clip_benchmark)")
    parser.add_argument("--output", default="ravl_discovery.json",
                        help="report JSON path; the PNG sheet goes beside it with the extension .png")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--compare", action="store_true",
                        help="also run the discovery baselines (random, George, Domino, Distilling Failures) on the "
                             "same regions: precision@10 of each in the JSON, a table and <output>_compare.png")
    add_data_flags(parser)
    dataset_plugins = {owner for (kind, _), owner in command_ctx.registry.owners.items() if kind == "datasets"}
    add_plugin_flags(parser, command_ctx.plugin_manager, only=dataset_plugins.__contains__)
    add_discover_flags(parser, command_ctx.registry)


def run_discover_command(args: argparse.Namespace, command_ctx) -> int:
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    run_discover(args, command_ctx.registry)
    return 0


def sheet_path(report_path: str, suffix: str = "") -> str:
    base = report_path[: -len(".json")] if report_path.endswith(".json") else report_path
    return base + suffix + ".png"


def context_from_args(args: argparse.Namespace, registry) -> RunContext:
    """The run context of a ``discover`` command (dataset, model, extractor), like ``eval`` builds it."""
    from ... import engine

    for name, value in (("feature_cache", None), ("no_feature_cache", False), ("shard_pattern", None),
                        ("allow_pipe_urls", False), ("skip_bad_samples", False)):
        if not hasattr(args, name):  # a Namespace built by hand (API use)
            setattr(args, name, value)
    args.verbose = not args.quiet
    dataset = engine.load_dataset(args, registry)
    if args.split not in dataset.splits():
        raise engine.EvalError(f"{args.dataset} has no split {args.split!r} (splits: {list(dataset.splits())})")
    return engine.build_context(args, registry, dataset, args.split)


def run_discover(args: argparse.Namespace, registry) -> dict[str, Any]:
    """``clip_benchmark_robust discover``: discovery, then the JSON report and PNG sheet, written atomically."""
    from ... import engine
    from ...atomic import write_files

    t0 = time.perf_counter()
    ctx = context_from_args(args, registry)
    proposer_name, proposer = make_proposer(args, registry)
    t_setup = time.perf_counter()  # dataset (generated on first use) and model loading
    try:
        run = discover(ctx, args.split, proposer_name, proposer, discovery_config(args),
                       truth_key=region_config(args).truth_key)
    except ValueError as exc:
        if isinstance(exc, DatasetError):
            raise
        raise engine.EvalError(f"discover: {exc}") from None
    t_discovery = time.perf_counter()
    compare = None
    if getattr(args, "compare", False):
        from .compare import compare_entry

        try:
            compare = compare_entry(run)
        except ValueError as exc:
            raise engine.EvalError(f"discover --compare: {exc}") from None
    report = build_report(run, {"dataset": args.dataset, "model": args.model, "pretrained": args.pretrained,
                                "model_type": args.model_type})
    needed = {run.keys[i] for _, items in sheet_rows(run) for i, _, _ in items}
    samples = collect_samples(ctx, args.split, needed)
    report["seconds"]["setup"] = round(t_setup - t0, 3)
    report["seconds"]["discovery_total"] = round(t_discovery - t_setup, 3)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    png = sheet_path(args.output)
    targets = [(args.output, lambda tmp: write_json(report, tmp)), (png, lambda tmp: write_sheet(tmp, run, samples))]
    if compare is not None:
        from .compare import format_table, write_figure

        report["compare"] = compare
        figure = sheet_path(args.output, "_compare")
        title = f"{args.dataset} [{args.split}], {args.model}/{args.pretrained}, seed {run.seed}"
        targets.append((figure, lambda tmp: write_figure(compare, tmp, title)))
    write_files(targets)
    print(format_summary(report, args.output, png))
    if compare is not None:
        print(format_table(compare))
        print(f"wrote {figure}")
    return report
