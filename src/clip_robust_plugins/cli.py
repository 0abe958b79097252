"""``clip_benchmark_robust``: clip_benchmark's CLI plus group robustness.

- ``eval``: every ``clip_benchmark eval`` flag (it is clip_benchmark's own parser), plus
  ``--mitigation``, ``--plugin``, ``--save_predictions``, ``--plot``, ``--feature_cache``
  and the flags plugins add.  Group datasets (``robust/<name>``, or ``wds/<name>`` whose
  root holds ``groups.json``) run through our engine, and so do zero-shot runs on
  clip_benchmark's own local ``wds/`` shards (class-level metrics, noted as having no
  groups); anything else runs through clip_benchmark's own code, unchanged except for
  its numpy>=2.4 accuracy crash.
- ``export_wds``: a registered dataset to grouped shards (:mod:`clip_robust_plugins.export`).
- ``discover``: RaVL's region-level discovery of learned spurious correlations (:mod:`clip_robust_plugins.mitigations.ravl`).
- ``build``: clip_benchmark's, unchanged.
- ``plugins``: JSON listing every plugin, its version, its hooks and what it registered.
- ``demo``: the offline end-to-end run on ``robust/spurious_shapes`` with the shipped
  tiny model, every registered mitigation, the table, JSON, CSV and plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

import torch

from . import engine, export
from .compat import clip_benchmark_patched
from .datasets.base import DatasetError
from .errors import one_line
from .groups import GroupSchemaError
from .mitigations import ravl
from .plugins import (
    PluginError,
    Registry,
    build_plugin_manager,
    describe_plugins,
    per_plugin_callers,
    set_plugin_manager,
)
from .states import StateError

PROG = "clip_benchmark_robust"
ENV_DEBUG = "CLIP_ROBUST_DEBUG"
#: errors that are the user's input, shown as one line (tracebacks with CLIP_ROBUST_DEBUG=1)
USER_ERRORS = (engine.EvalError, DatasetError, GroupSchemaError, PluginError, StateError, FileNotFoundError)


def _clip_benchmark_parser() -> argparse.ArgumentParser:
    """clip_benchmark's own parser object (its builder parses sys.argv, so give it a valid one)."""
    import clip_benchmark.cli as cb_cli

    saved = sys.argv
    sys.argv = ["clip_benchmark", "build", os.devnull]
    try:
        parser, _ = cb_cli.get_parser_args()
    finally:
        sys.argv = saved
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def add_robust_eval_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("group robustness (clip_benchmark_robust)")
    group.add_argument(
        "--mitigation", nargs="+", default=[], metavar="NAME",
        help="mitigation(s) to evaluate beside zero-shot (always run as the baseline); see `clip_benchmark_robust plugins`",
    )
    group.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import MODULE as a plugin for this run (repeatable), like `pytest -p`",
    )
    group.add_argument(
        "--save_predictions", action="store_true",
        help="write <output>_predictions.csv (key,y,group,pred_<method>...) beside the results JSON",
    )
    group.add_argument("--plot", action="store_true", help="write <output>_groups.png, per-group accuracy per method")
    group.add_argument(
        "--save_mitigation_state", action="store_true",
        help="write each fitted mitigation's state to <output>_state_<method>.safetensors",
    )
    group.add_argument(
        "--mitigation_state", nargs="+", default=[], metavar="FILE",
        help="use fitted state file(s) written by --save_mitigation_state instead of fitting (the file names its method)",
    )
    group.add_argument(
        "--feature_cache", default=None, metavar="DIR",
        help="feature cache directory (default $CLIP_ROBUST_FEATURE_CACHE or ~/.cache/clip_robust_plugins/features)",
    )
    group.add_argument("--no_feature_cache", action="store_true", help="do not read or write cached features")
    group.add_argument("--trace_plugins", action="store_true", help="log every plugin hook call to stderr")
    group.add_argument(
        "--shard_pattern", default=None, metavar="PATTERN",
        help="wds/ datasets: each split's shards as a brace pattern with {split}, relative to --dataset_root or "
        "absolute, e.g. '{split}/shard-{000..011}.tar' (instead of {split}/nshards.txt)",
    )
    group.add_argument(
        "--allow_pipe_urls", action="store_true",
        help="allow webdataset pipe: URLs in --shard_pattern; their text runs as a shell command (only for commands you trust)",
    )
    group.add_argument(
        "--skip_bad_samples", action="store_true",
        help="skip samples whose image does not decode (recorded in the results JSON under robust.skipped_samples) "
        "instead of failing; every other bad input stays an error",
    )


def build_parser(pm, registry: Registry) -> argparse.ArgumentParser:
    parser = _clip_benchmark_parser()
    parser.prog = PROG
    parser.description = "clip_benchmark with group-robustness datasets, metrics and mitigations (pluggy plugins)."
    sub = _subparsers(parser)
    for choice in sub.choices.values():
        choice.prog = choice.prog.replace("clip_benchmark", PROG, 1)
    eval_parser = sub.choices["eval"]
    add_robust_eval_flags(eval_parser)
    for plugin_name, caller in per_plugin_callers(pm, "add_arguments"):
        caller(parser=eval_parser.add_argument_group(f"plugin {plugin_name}"))

    plugins_parser = sub.add_parser("plugins", help="list plugins, their versions, hooks and registrations as JSON")
    plugins_parser.add_argument("--plugin", action="append", default=[], metavar="MODULE", help="also load MODULE")
    plugins_parser.add_argument("--trace_plugins", action="store_true", help="log every plugin hook call to stderr")
    plugins_parser.set_defaults(which="plugins")

    demo_parser = sub.add_parser(
        "demo", help="offline end-to-end demo: spurious_shapes, the shipped tiny model, every mitigation",
        description="Runs offline. Any `eval` flag after the demo's own flags overrides the demo's presets.",
    )
    demo_parser.add_argument("--output_dir", default="crp_demo", help="where data, features and results go (default ./crp_demo)")
    demo_parser.set_defaults(which="demo")
    export.add_parser(sub, pm)
    ravl.add_discover_parser(sub, pm)
    return parser


def plugins_json(pm, registry: Registry) -> list[dict]:
    rows = describe_plugins(pm)
    for row in rows:
        row["registers"] = {
            kind: sorted(name for (k, name), owner in registry.owners.items() if k == kind and owner == row["name"])
            for kind in (
                "datasets", "metrics", "mitigations", "model_loaders", "checkpoints", "view_providers", "region_proposers"
            )
        }
    return rows


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def demo_eval_argv(output_dir: str, registry: Registry) -> list[str]:
    """The eval command line the demo runs (printed, so a user can rerun or vary it)."""
    mitigations = [name for name in registry.mitigations if name != engine.BASELINE]
    argv = [
        "eval", "--dataset", "robust/spurious_shapes", "--dataset_root", os.path.join(output_dir, "data"),
        "--model", "crp-tiny", "--pretrained", "spurious_shapes",
        "--feature_cache", os.path.join(output_dir, "features"),
        "--output", os.path.join(output_dir, "results.json"),
        "--save_predictions", "--plot", "--num_workers", "0", "--batch_size", "256",
    ]
    if mitigations:
        argv += ["--mitigation", *mitigations]
    for name in mitigations:
        argv += list(registry.mitigation(name).demo_flags)
    if _device() == "cpu":
        argv.append("--no_amp")  # the tiny model is fastest and exact in fp32 on a CPU
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    pre.add_argument("--trace_plugins", action="store_true")
    known, _ = pre.parse_known_args(argv)
    try:
        pm = build_plugin_manager(known.plugin, trace=True if known.trace_plugins else None)
        registry = set_plugin_manager(pm)
        return _main(argv, pm, registry)
    except USER_ERRORS as exc:
        if os.environ.get(ENV_DEBUG, "") not in ("", "0"):
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _main(argv: list[str], pm, registry: Registry) -> int:
    import clip_benchmark.cli as cb_cli

    holder: dict = {}

    def dispatch(run_args: argparse.Namespace):
        run_args.device = _device()
        root = engine.resolve_root(run_args)
        zeroshot = run_args.task in ("auto", "zeroshot_classification")
        # clip_benchmark's own classification shards: our engine, class-level metrics (other tasks: its run)
        if engine.is_group_dataset(run_args.dataset, root) or (zeroshot and engine.is_class_only_wds(run_args.dataset, root)):
            if run_args.task not in ("auto", "zeroshot_classification"):
                raise engine.EvalError(
                    f"{run_args.dataset}: task {run_args.task!r} is not available on group datasets here; "
                    "use zeroshot_classification (with --mitigation)"
                )
            engine.run(run_args, registry)
            return 0
        if run_args.mitigation:
            raise engine.EvalError(
                f"--mitigation needs a group dataset (robust/<name>, or wds/<name> whose root has groups.json); "
                f"{run_args.dataset} at {root!r} has none"
            )
        ours = [flag for flag, on in (("--shard_pattern", run_args.shard_pattern is not None),
                                      ("--allow_pipe_urls", run_args.allow_pipe_urls),
                                      ("--skip_bad_samples", run_args.skip_bad_samples)) if on]
        if ours:
            raise engine.EvalError(f"{ours[0]} applies to datasets our engine reads; {run_args.dataset} runs through clip_benchmark")
        return holder["run"](run_args)

    loaders = {name: spec.load for name, spec in registry.model_loaders.items()}
    with clip_benchmark_patched(loaders, run=dispatch) as original_run:
        holder["run"] = original_run
        parser = build_parser(pm, registry)
        if argv and argv[0] == "demo":
            demo_args, extra = parser.parse_known_args(argv)
            eval_argv = demo_eval_argv(demo_args.output_dir, registry) + extra
            print(f"demo: {PROG} {' '.join(eval_argv)}", file=sys.stderr)
            args = parser.parse_args(eval_argv)
        else:
            args = parser.parse_args(argv)
        which = getattr(args, "which", None)
        if which is None:
            parser.print_help()
            return 0
        if which == "plugins":
            print(json.dumps(plugins_json(pm, registry), indent=1))
            return 0
        if which == "export_wds":
            return export.run_export(args, pm, registry)
        if which == "discover":
            args.device = _device()
            ravl.run_discover(args, registry)
            return 0
        if which == "build":
            cb_cli.main_build(args)
            return 0
        cb_cli.main_eval(args)
        if argv and argv[0] == "demo":
            out = os.path.join(demo_args.output_dir, "results")
            print(f"demo: wrote {out}.json, {out}_predictions.csv and {out}_groups.png", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
