"""The ``export_wds`` command (a built-in plugin): registering it imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

from ..argtypes import at_least, option
from ..hookspecs import hookimpl
from ..specs import CommandContext, CommandSpec


@dataclass(frozen=True)
class ExportConfig:
    """``export_wds``'s flags (the dataset's own flags join them: ``record_flags``)."""

    dataset: str | None = option(None, "robust/NAME (see `clip_benchmark_robust plugins`)", type=str, required=True)
    dataset_root: str | None = option(None, "where the source dataset is", type=str, required=True)
    output_dir: str | None = option(None, "new or empty folder (or an earlier export) for the shards", type=str,
                                    required=True)
    splits: tuple[str, ...] | None = option(None, "splits to export (none: all)", type=str, nargs="+",
                                            metavar="SPLIT")
    shard_size: int = option(1000, "samples per tar shard at most", type=at_least(1))
    min_shards: int = option(
        8, "spread each split over at least this many shards (fewer only when it has fewer samples), so "
        "clip_benchmark's reader with up to that many --num_workers finds samples in every worker", type=at_least(1))
    num_workers: int | None = option(None, "processes that read and encode images (none: all cores; 0: this "
                                     "process only)", type=int)
    no_progress: bool = option(False, "no progress bar", switch=True)


def run_export_command(config: ExportConfig, ctx: CommandContext) -> int:
    from .shards import run_export

    return run_export(config, ctx)


@hookimpl
def register_commands(register):
    register(CommandSpec(
        "export_wds",
        "write a registered dataset as grouped WebDataset shards (readable by clip_benchmark's wds/)",
        run_export_command,
        options=ExportConfig,
        record_flags=("datasets",),
        description="Export robust/NAME to DIR/{split}/N.tar + classnames.txt, templates and groups.json; "
        "then `clip_benchmark eval --dataset wds/NAME --dataset_root DIR` reads it.",
    ))
