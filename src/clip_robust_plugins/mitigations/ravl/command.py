"""``clip_benchmark_robust discover``: discovery on a split, then the JSON report and PNG sheet (atomic)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

from ...datasets.base import DatasetError
from ..base import RunContext
from .configs import DiscoverConfig
from .discovery_report import build_report, format_summary, write_json
from .proposers import proposer_for
from .sheet import collect_samples, sheet_rows, write_sheet
from .split_discovery import discover


def run_discover_command(config: DiscoverConfig, command_ctx) -> int:
    import torch

    run_discover(config, command_ctx, "cuda" if torch.cuda.is_available() else "cpu")
    return 0


def sheet_path(report_path: str, suffix: str = "") -> str:
    base = report_path[: -len(".json")] if report_path.endswith(".json") else report_path
    return base + suffix + ".png"


def engine_options(config: DiscoverConfig, device: str) -> argparse.Namespace:
    """The settings the engine's run context reads, under the names ``eval``'s flags have."""
    return argparse.Namespace(
        dataset=config.dataset, dataset_root=config.dataset_root, model=config.model, pretrained=config.pretrained,
        model_type=config.model_type, model_cache_dir=config.model_cache_dir, batch_size=config.batch_size,
        num_workers=config.num_workers, seed=config.seed, amp=not config.no_amp, device=device,
        verbose=not config.quiet, **asdict(config.data),
    )


def discover_context(config: DiscoverConfig, command_ctx, device: str) -> RunContext:
    """The run context of a ``discover`` command (dataset, model, extractor), built as ``eval`` builds it."""
    from ... import engine

    dataset = command_ctx.load_dataset(config.dataset, config.dataset_root)
    if config.split not in dataset.splits():
        raise engine.EvalError(f"{config.dataset} has no split {config.split!r} (splits: {list(dataset.splits())})")
    return engine.build_context(engine_options(config, device), command_ctx.registry, dataset, config.split,
                                config_of=command_ctx.config_of)


def run_discover(config: DiscoverConfig, command_ctx, device: str) -> dict[str, Any]:
    """``clip_benchmark_robust discover``: discovery, then the JSON report and PNG sheet, written atomically."""
    from ... import engine
    from ...atomic import write_files

    t0 = time.perf_counter()
    ctx = discover_context(config, command_ctx, device)
    proposer_name, proposer = proposer_for(ctx, config.regions.regions)
    t_setup = time.perf_counter()  # dataset (generated on first use) and model loading
    try:
        run = discover(ctx, config.split, proposer_name, proposer, config.discovery,
                       truth_key=config.regions.truth_key)
    except ValueError as exc:
        if isinstance(exc, DatasetError):
            raise
        raise engine.EvalError(f"discover: {exc}") from None
    t_discovery = time.perf_counter()
    compare = None
    if config.compare:
        from .compare import compare_entry

        try:
            compare = compare_entry(run)
        except ValueError as exc:
            raise engine.EvalError(f"discover --compare: {exc}") from None
    report = build_report(run, {"dataset": config.dataset, "model": config.model, "pretrained": config.pretrained,
                                "model_type": config.model_type})
    needed = {run.keys[i] for _, items in sheet_rows(run) for i, _, _ in items}
    samples = collect_samples(ctx, config.split, needed)
    report["seconds"]["setup"] = round(t_setup - t0, 3)
    report["seconds"]["discovery_total"] = round(t_discovery - t_setup, 3)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    png = sheet_path(config.output)
    targets = [(config.output, lambda tmp: write_json(report, tmp)), (png, lambda tmp: write_sheet(tmp, run, samples))]
    if compare is not None:
        from .compare import format_table, write_figure

        report["compare"] = compare
        figure = sheet_path(config.output, "_compare")
        title = f"{config.dataset} [{config.split}], {config.model}/{config.pretrained}, seed {run.seed}"
        targets.append((figure, lambda tmp: write_figure(compare, tmp, title)))
    write_files(targets)
    print(format_summary(report, config.output, png))
    if compare is not None:
        print(format_table(compare))
        print(f"wrote {figure}")
    return report
