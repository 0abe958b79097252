"""The ``report`` command (a built-in plugin): one page over many results JSONs.

``clip_benchmark_robust report RESULTS... --output_dir DIR`` reads results JSONs (or
directories of them) and writes ``results_long.csv``, ``report.md``, PNG plots and a
self-contained ``report.html`` (see ``docs/report.md``).  Registering the command imports
nothing heavy; the work lives in :mod:`.build` and is imported when the command runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..argtypes import option
from ..hookspecs import hookimpl
from ..specs import CommandContext, CommandSpec


def write_report(inputs: list[str], output_dir: str, warn=None) -> list[str]:
    """Read the results JSONs in ``inputs`` (files or directories) and write the report into
    ``output_dir``, all-or-nothing; returns the written paths.  Bad input raises EvalError;
    ``warn(text)`` gets each warning (default: Python warnings)."""
    from .build import write_report as build

    return build(inputs, output_dir, warn)


@dataclass(frozen=True)
class ReportConfig:
    """The ``report`` command's inputs."""

    results: tuple[str, ...] = option(
        (), "results JSON files written by `eval`, or directories searched for them (recursively)",
        positional=True, metavar="RESULTS")
    output_dir: str | None = option(
        None, "where results_long.csv, report.md, report.html and the PNG plots go", type=str, metavar="DIR",
        required=True)


def _run(config: ReportConfig, ctx: CommandContext) -> int:
    for path in write_report(list(config.results), config.output_dir,
                             warn=lambda text: print(text, file=sys.stderr)):
        print(f"Wrote {path}", file=sys.stderr)
    return 0


@hookimpl
def register_commands(register):
    register(CommandSpec(
        "report",
        "tables and plots across results JSONs (models, datasets, mitigations, seeds): CSV, Markdown, HTML",
        _run,
        options=ReportConfig,
        description="Reads results JSONs (or directories of them) and writes DIR/results_long.csv (one row per "
        "dataset, model, pretrained, method, seed and metric, with its interval), DIR/report.md and DIR/report.html "
        "(per dataset: a leaderboard with mean +/- std over seeds, or the interval of a single run; a method x group "
        "accuracy table; per-group, forest and scatter figures; the methods' own figures; each run's command line) "
        "and the PNG figures. A row is one method with one set of recorded settings: runs are averaged only when "
        "they differ in nothing but the seed.",
    ))
