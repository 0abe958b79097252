"""The ``export_wds`` command (a built-in plugin): registering it imports nothing heavy."""

from __future__ import annotations

import argparse

from ..hookspecs import hookimpl
from ..specs import CommandContext, CommandSpec


def add_export_arguments(parser: argparse.ArgumentParser, ctx: CommandContext) -> None:
    """Export's own flags, plus the flags of the plugins that register datasets (a dataset reads its own)."""
    from ..argtypes import at_least
    from ..plugins import add_plugin_flags, add_spec_flags

    parser.add_argument("--dataset", required=True, help="robust/NAME (see `clip_benchmark_robust plugins`)")
    parser.add_argument("--dataset_root", required=True, help="where the source dataset is")
    parser.add_argument("--output_dir", required=True, help="new or empty folder (or an earlier export) for the shards")
    parser.add_argument("--splits", nargs="+", default=None, metavar="SPLIT", help="splits to export (default: all)")
    parser.add_argument("--shard_size", type=at_least(1), default=1000, help="samples per tar shard at most (default: %(default)s)")
    parser.add_argument(
        "--min_shards", type=at_least(1), default=8,
        help="spread each split over at least this many shards (fewer only when it has fewer samples), so "
        "clip_benchmark's reader with up to that many --num_workers finds samples in every worker (default: %(default)s)",
    )
    parser.add_argument(
        "--num_workers", type=int, default=None,
        help="processes that read and encode images (default: all cores; 0: this process only)",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    dataset_plugins = {owner for (kind, _), owner in ctx.registry.owners.items() if kind == "datasets"}
    add_plugin_flags(parser, ctx.plugin_manager, only=dataset_plugins.__contains__)
    add_spec_flags(parser, ctx.registry, kinds=("datasets",))


def run_export_command(args: argparse.Namespace, ctx: CommandContext) -> int:
    from .shards import run_export

    return run_export(args, ctx.plugin_manager, ctx.registry)


@hookimpl
def register_commands(register):
    register(CommandSpec(
        "export_wds",
        "write a registered dataset as grouped WebDataset shards (readable by clip_benchmark's wds/)",
        add_export_arguments,
        run_export_command,
        description="Export robust/NAME to DIR/{split}/N.tar + classnames.txt, templates and groups.json; "
        "then `clip_benchmark eval --dataset wds/NAME --dataset_root DIR` reads it.",
    ))
