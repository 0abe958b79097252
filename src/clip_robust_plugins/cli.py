"""``clip_benchmark_robust``: clip_benchmark's CLI plus group robustness.

- ``eval``: every ``clip_benchmark eval`` flag (clip_benchmark's own parser), plus our flags
  and the plugins'.  Group datasets (``robust/<name>``, ``wds/<name>`` with ``groups.json``)
  and clip_benchmark's local ``wds/`` classification shards run through our engine; anything
  else through clip_benchmark's own code.
- ``build``: clip_benchmark's.  ``plugins``: a table of every plugin (``--json``: the machine form).
  ``demo``: the offline run of the built-in methods.
- Subcommands registered by plugins (``register_commands``): ``discover`` (RaVL),
  ``export_wds``, ``report``, and any third party's.

Start-up is cheap: plugins register without importing torch, the parser is built from
clip_benchmark's source without importing it, and a subcommand's flags are added only
when that subcommand runs.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import traceback
from collections.abc import Sequence

from .argtypes import add_data_flags
from .cli_help import organise_eval_help, plugins_table
from .errors import EvalError, one_line, stage
from .plugins import (
    BUILTIN_PLUGINS,
    REGISTRY_KINDS,
    PluginError,
    Registry,
    add_command_flags,
    add_plugin_flags,
    add_spec_flags,
    build_plugin_manager,
    cli_name,
    collect_registry,
    describe_plugins,
    plugin_parent_parser,
    record_flag_values,
)
from .specs import CommandContext

PROG = "clip_benchmark_robust"
ENV_DEBUG = "CLIP_ROBUST_DEBUG"


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, shown as one line (tracebacks with CLIP_ROBUST_DEBUG=1)."""
    from .errors import passthrough_errors

    return (*passthrough_errors(), FileNotFoundError)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def add_robust_eval_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("group robustness (clip_benchmark_robust)")
    group.add_argument(
        "--mitigation", nargs="+", default=[], metavar="NAME",
        help="mitigation(s) to evaluate beside zero-shot (always run as the baseline); see `clip_benchmark_robust plugins`; "
        "`all_baselines` runs every registered method whose labels and splits the dataset has",
    )
    group.add_argument(
        "--save_predictions", action="store_true",
        help="write <output>_predictions.csv (key,y,group,pred_<method>...) beside the results JSON",
    )
    group.add_argument("--plot", action="store_true",
                       help="write <output>_groups.png (per-group accuracy per method) and each method's own figures")
    group.add_argument(
        "--save_mitigation_state", action="store_true",
        help="write each fitted mitigation's state to <output>_state_<method>.safetensors",
    )
    group.add_argument(
        "--mitigation_state", nargs="+", default=[], metavar="FILE",
        help="use fitted state file(s) written by --save_mitigation_state instead of fitting (the file names its method)",
    )
    add_data_flags(parser)


def _many_seeds(parser: argparse.ArgumentParser) -> None:
    """clip_benchmark's ``--seed N`` takes a list here: one process, features extracted once."""
    action = next(a for a in parser._actions if a.dest == "seed")
    action.nargs = "+"
    action.help = ("random seed(s); several (--seed 0 1 2) evaluate every method once per seed on the same "
                   "features, one results file each: put {seed} in --output")


def _precision_flags(parser: argparse.ArgumentParser) -> None:
    """``--amp`` / ``--no_amp``; neither: autocast on CUDA, fp32 on a CPU (see :func:`resolve_amp`)."""
    no_amp = next(a for a in parser._actions if a.dest == "amp")
    no_amp.default = None
    no_amp.help = "fp32 everywhere (no torch.autocast); the default on a CPU"
    parser.add_argument("--amp", action="store_true", dest="amp", default=None,
                        help="mixed precision (torch.autocast: fp16 on CUDA, bf16 on a CPU); the default on CUDA")


def _workers_flag(parser: argparse.ArgumentParser) -> None:
    """``--num_workers`` unset: chosen from the cores (:func:`resolve_workers`), not clip_benchmark's 4."""
    action = next(a for a in parser._actions if a.dest == "num_workers")
    action.default = None
    action.help = ("DataLoader workers decoding images; default: 0 below 4 CPU cores, cores // 8 from 4 up, "
                   "cores - 1 (at most 16) on CUDA; the forward gets torch threads for the other cores")


def resolve_workers(args: argparse.Namespace, device: str) -> None:
    """No ``--num_workers``: the thread budget's default (``features/threads.py``, docs/performance.md)."""
    if args.num_workers is None:
        from .features.threads import available_cores, default_workers

        args.num_workers = default_workers(available_cores(), device)


def resolve_amp(args: argparse.Namespace, device: str) -> None:
    """Neither ``--amp`` nor ``--no_amp`` given: AMP on CUDA (clip_benchmark's default), fp32 on a
    CPU, where bf16 autocast changes results (whatever it saves in time)."""
    if args.amp is None:
        args.amp = device.startswith("cuda")


def build_parser(pm, registry: Registry, command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; only ``command``'s own flags are filled in (the others list their help line)."""
    from .compat import clip_benchmark_parser

    parser = clip_benchmark_parser(sorted(registry.model_loaders))
    parser.prog = PROG
    parser.description = "clip_benchmark with group-robustness datasets, metrics and mitigations (pluggy plugins)."
    sub = _subparsers(parser)
    for choice in sub.choices.values():
        choice.prog = choice.prog.replace("clip_benchmark", PROG, 1)
    parent = plugin_parent_parser()
    eval_parser = sub.choices["eval"]
    if command in ("eval", "demo"):
        plugin_group = eval_parser.add_argument_group("plugins")
        for action in parent._actions:
            eval_parser._add_action(action)
            eval_parser._optionals._group_actions.remove(action)
            plugin_group._group_actions.append(action)
        add_robust_eval_flags(eval_parser)
        _many_seeds(eval_parser)
        _precision_flags(eval_parser)
        _workers_flag(eval_parser)
        add_plugin_flags(eval_parser, pm)
        add_spec_flags(eval_parser, registry)
        organise_eval_help(eval_parser)

    plugins_parser = sub.add_parser("plugins", parents=[parent], prog=f"{PROG} plugins",
                                    help="list plugins, their versions and what they register (--json: everything)")
    plugins_parser.add_argument("--json", action="store_true",
                                help="print every plugin's name, version, hooks and registrations as JSON")
    plugins_parser.set_defaults(which="plugins")
    demo_parser = sub.add_parser(
        "demo", prog=f"{PROG} demo", parents=[parent],
        help="offline end-to-end demo: spurious_shapes, the shipped tiny model, every mitigation",
        description="Runs offline. Any `eval` flag after the demo's own flags overrides the demo's presets.",
    )
    demo_parser.add_argument("--output_dir", default="crp_demo", help="where data, features and results go (default ./crp_demo)")
    demo_parser.set_defaults(which="demo")
    for name, spec in registry.commands.items():
        if name in sub.choices:
            raise PluginError(f"plugin {registry.owner('commands', name)!r} registers command {name!r}, which exists already")
        command_parser = sub.add_parser(name, prog=f"{PROG} {name}", help=spec.help, description=spec.description or spec.help,
                                        parents=[parent] if name == command else [])
        command_parser.set_defaults(which=name)
        if name == command:
            add_command_flags(command_parser, spec, registry, pm)
    return parser


def command_context(args: argparse.Namespace, pm, registry: Registry) -> CommandContext:
    """The host's services over a subcommand's parsed flags (see :class:`CommandContext`)."""
    from . import engine
    from .argtypes import spec_config

    def load_dataset(dataset: str, dataset_root: str):
        options = argparse.Namespace(**{**vars(args), "dataset": dataset, "dataset_root": dataset_root})
        for name in ("shard_pattern", "allow_pipe_urls"):  # data flags a command may not declare
            options.__dict__.setdefault(name, None)
        return engine.load_dataset(options, registry)

    return CommandContext(registry=registry, plugin_manager=pm, config_of=lambda record: spec_config(record, args),
                          load_dataset=load_dataset,
                          flag_values=lambda kind, name: record_flag_values(args, pm, registry, kind, name))


def run_command(spec, args: argparse.Namespace, pm, registry: Registry) -> int:
    """A plugin's subcommand: its typed config from its parsed flags, and the host's services."""
    from .argtypes import config_from_options

    owner = f"command {spec.name!r} (plugin {registry.owner('commands', spec.name)!r})"
    config = None if spec.options is None else config_from_options(spec.options, spec.option_prefix, args, owner=owner)
    ctx = command_context(args, pm, registry)
    with stage(owner, "run"):
        return int(spec.run(config, ctx) or 0)


def plugins_json(pm, registry: Registry) -> list[dict]:
    """Every plugin with what it registers, by the names the CLI takes (``robust/<dataset>``)."""
    rows = describe_plugins(pm)
    for row in rows:
        row["registers"] = {
            kind: sorted(cli_name(k, name) for (k, name), owner in registry.owners.items()
                         if k == kind and owner == row["name"])
            for kind in REGISTRY_KINDS
        }
    return rows


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def demo_mitigations(registry: Registry) -> list[str]:
    """The methods the demo runs: the built-ins, and a third party's only when it declares demo
    settings, so an installed plugin cannot make the first command a user runs slow."""

    return [name for name, spec in registry.mitigations.items()
            if not spec.baseline and (registry.owner("mitigations", name) in BUILTIN_PLUGINS or spec.demo_flags)]


def demo_eval_argv(output_dir: str, registry: Registry) -> list[str]:
    """The eval command line the demo runs (printed, so a user can rerun or vary it)."""
    mitigations = demo_mitigations(registry)
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
    return argv


def _command_name(argv: Sequence[str]) -> str | None:
    """The subcommand (the first word that is not a flag), before any parsing."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = plugin_parent_parser().parse_known_args(argv)  # --plugin / --trace_plugins, before the registry
    try:
        pm = build_plugin_manager(known.plugin, trace=True if known.trace_plugins else None)
        registry = collect_registry(pm)
        return _main(argv, pm, registry)
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        if known.trace_plugins or os.environ.get(ENV_DEBUG, "") not in ("", "0"):
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _main(argv: list[str], pm, registry: Registry) -> int:
    command = _command_name(argv)
    parser = build_parser(pm, registry, command)
    if command == "demo":
        demo_args, extra = parser.parse_known_args(argv)
        eval_argv = demo_eval_argv(demo_args.output_dir, registry) + extra
        print(f"demo: {PROG} {' '.join(eval_argv)}", file=sys.stderr)
        args = build_parser(pm, registry, "eval").parse_args(eval_argv)
        args.command_line = [PROG, *eval_argv]  # the eval the demo ran, recorded in the results JSON
        run_eval(args, pm, registry)
        from .report import write_report

        out = os.path.join(demo_args.output_dir, "results")
        report_dir = os.path.join(demo_args.output_dir, "report")
        write_report([args.output], report_dir)
        page = os.path.join(report_dir, "report.html")
        print(f"demo: wrote {out}.json, {out}_predictions.csv, {out}_groups.png and {page}", file=sys.stderr)
        print(os.path.abspath(page), flush=True)  # the last line on stdout: where to look
        return 0
    args, extra = parser.parse_known_args(argv)
    args.command_line = [PROG, *argv]  # recorded in the results JSON (robust.command_line)
    if extra:  # the subcommand's usage, not the top level's
        _subparsers(parser).choices.get(command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    which = getattr(args, "which", None)
    if which is None:
        parser.print_help()
        return 0
    if which == "plugins":
        rows = plugins_json(pm, registry)
        print(json.dumps(rows, indent=1) if args.json else plugins_table(rows))
        return 0
    if which == "build":
        import clip_benchmark.cli as cb_cli

        cb_cli.main_build(args)
        return 0
    if which == "eval":
        run_eval(args, pm, registry)
        return 0
    return run_command(registry.commands[which], args, pm, registry)


# --------------------------------------------------------------------------- eval


def own_runs(args: argparse.Namespace) -> list[argparse.Namespace] | None:
    """clip_benchmark's model x dataset x language expansion, when every dataset is one our
    engine reads and nothing needs clip_benchmark's collections; None otherwise (then
    clip_benchmark's own ``main_eval`` runs, with group datasets routed to our engine)."""
    from . import engine

    if args.distributed:
        return None
    if args.pretrained_model:
        names = args.pretrained_model if isinstance(args.pretrained_model, list) else [args.pretrained_model]
        if any(os.path.isfile(n) or n.count(",") != 1 for n in names):
            return None
        models = [tuple(n.split(",")) for n in names]
    else:
        models = list(itertools.product(args.model, args.pretrained))
    datasets = args.dataset if isinstance(args.dataset, list) else [args.dataset]
    languages = args.language if isinstance(args.language, list) else [args.language]
    for name in datasets:
        probe = copy.copy(args)
        probe.dataset = name
        if os.path.isfile(name) or not engine.is_ours(probe):
            return None
    runs = []
    for (model, pretrained), dataset, language in itertools.product(models, datasets, languages):
        run_args = copy.copy(args)
        run_args.model, run_args.pretrained, run_args.dataset, run_args.language = model, pretrained, dataset, language
        for name in ("train_split", "val_split", "val_proportion"):
            value = getattr(args, name)
            setattr(run_args, name, value[0] if isinstance(value, list) and len(value) == 1 else value)
        runs.append(run_args)
    return runs


def run_eval(args: argparse.Namespace, pm, registry: Registry) -> None:
    """``eval``: our engine for our datasets, clip_benchmark's ``main_eval`` otherwise."""
    resolve_amp(args, _device())
    resolve_workers(args, _device())
    runs = own_runs(args)
    if runs is not None:
        for run_args in runs:
            run_one(run_args, registry)
        return
    import clip_benchmark.cli as cb_cli

    from . import engine
    from .compat import clip_benchmark_patched

    if isinstance(args.seed, list):  # clip_benchmark's own runs take one seed
        if len(engine.seeds(args.seed)) > 1:
            raise EvalError(f"several --seed values apply to datasets our engine reads, not to {args.dataset}")
        args.seed = args.seed[0]
        args.output = args.output.replace("{seed}", str(args.seed))  # clip_benchmark fills the other fields

    holder: dict = {}

    def dispatch(run_args: argparse.Namespace):
        if engine.is_ours(run_args):
            run_one(run_args, registry)
            return 0
        engine.check_clip_benchmark_run(run_args)
        return holder["run"](run_args)

    loaders = {name: spec.bind(registry) for name, spec in registry.model_loaders.items()}
    with clip_benchmark_patched(loaders, run=dispatch) as original_run:
        holder["run"] = original_run
        cb_cli.main_eval(args)


def run_one(args: argparse.Namespace, registry: Registry) -> None:
    """One run through our engine: check, evaluate, print the table, write all-or-nothing."""
    from . import engine, run_output
    from .atomic import check_writable

    args.device = _device()
    engine.check_seed_template(args)
    outs = [engine.output_path(args, seed=seed) for seed in engine.seeds(args.seed)]
    if all(os.path.exists(out) for out in outs) and args.skip_existing:
        if args.verbose:
            print(f"Skip {', '.join(outs)}, exists already.")
        return
    for out in outs:
        check_writable(out)
    results = engine.run_seeds(args, registry)
    if results is None:  # a torchrun worker rank: rank 0 reports
        return
    for result, out in zip(results, outs):
        result.dump["robust"]["command_line"] = getattr(args, "command_line", None)
        print(run_output.format_table(result), file=sys.stdout)
        written = run_output.write_outputs(
            result, out, predictions=args.save_predictions, plot=args.plot, save_states=args.save_mitigation_state
        )
        if args.verbose:
            for path in written:
                print(f"Wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
