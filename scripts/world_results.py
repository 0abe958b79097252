"""Every method in the CLIP-like world: docs/results.md with one command.

    python3 scripts/world_results.py                         # all tasks, seeds 0 1 2
    python3 scripts/world_results.py --tasks waterbirds_like --seeds 0 --work_dir /tmp/w
    python3 scripts/world_results.py --quick --work_dir /tmp/q --output /tmp/q/results.md

For every task, one ``clip_benchmark_robust eval`` process on ``robust/clipworld`` with
``crp-world``/``clipworld`` runs all seeds on shared features (``--seed 0 1 2 --output
TASK/{seed}.json``) with every registered method except the costly ones (:data:`COSTLY`:
fine-tuning, many-epoch training, per-image test-time tuning); those run at the first seed
only, as the separate tasks ``waterbirds_like_costly`` and ``patch_costly``, and are left out
of the other tasks (the time budget of a shared 2-core CPU machine). ``patch_ravl_protocol``
is RaVL's protocol on the patch task: ``crp-world``/``clipworld_patch_ft`` (the biased
fine-tune) evaluated and used for discovery, ``ravl`` and ``clip_ft`` fine-tuning from
``--ravl_init clipworld`` for 3 epochs at lr 1e-4, every seed. Generated tasks use
smaller splits (:data:`GENERATED_SIZES`). ``--methods`` replaces the method lists everywhere.
Then ``clip_benchmark_robust report`` runs twice over the results: once over every seed (cells
``mean ± std``) and once over the first seed alone (cells ``value [low, high]``, the run's own
intervals); the leaderboard tables of both reports are copied into the output Markdown as
they are.  A task whose results JSONs all exist is not run again (resumable); its recorded
wall time is kept.  ``--quick`` shrinks every split (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: generated tasks: class field x spurious field, train correlation 0.9, balanced val/test
GENERATED_CORRELATION = 0.9
#: split sizes of the generated tasks (the presets keep theirs: 2000/400/400)
GENERATED_SIZES = (1000, 400, 400)
QUICK_SIZES = (120, 48, 48)
#: the most expensive methods (fine-tuning, many-epoch training, per-image test-time tuning with
#: extra views or region features): run on the first seed only, as a separate ``<task>_costly``
#: eval, for the presets that have one, and left out of the other tasks (time budget)
COSTLY = ("cfr", "clip_ft", "clip_ft_group_dro", "ravl", "seraser", "tpt", "wise_ft", "wise_ft_weights")

TASKS: dict[str, dict] = {
    "waterbirds_like": {"preset": "waterbirds_like"},
    "waterbirds_like_costly": {"preset": "waterbirds_like", "costly": True},
    "celeba_like": {"preset": "celeba_like"},
    "patch": {"preset": "patch"},
    "patch_costly": {"preset": "patch", "costly": True},
    # RaVL's protocol: discovery on (and evaluation of) the biased fine-tune, both fine-tunings
    # starting from the pretrained model, at the settings of the protocol run on
    # spurious_quadrants (docs/methods/ravl.md: 3 epochs at lr 1e-4); every seed
    "patch_ravl_protocol": {"preset": "patch", "pretrained": "clipworld_patch_ft", "methods": ("ravl", "clip_ft"),
                            "flags": ("--ravl_init", "clipworld", "--ravl_epochs", "3", "--ravl_lr", "1e-4")},
    "colour_scene": {"class": ("colour", "red", "green"), "spurious": ("scene", "sand", "snow")},
    "shape_colour": {"class": ("shape", "star", "ring"), "spurious": ("colour", "red", "yellow")},
    "size_scene": {"class": ("size", "small", "large"), "spurious": ("scene", "bricks", "sky")},
}
CHECKPOINT = Path(__file__).resolve().parents[1] / "src" / "clip_robust_plugins" / "assets" / "crp-world_clipworld.safetensors"
SKIP_NOTE = re.compile(r"^note: .* leaves out (\S+): (.*)$")


def task_flags(name: str, quick: bool) -> list[str]:
    """The ``--world_*`` flags of a task (split sizes only for generated tasks, or in quick mode)."""
    task = TASKS[name]
    if "preset" in task:
        flags = ["--world_preset", task["preset"]]
        sizes = QUICK_SIZES if quick else None
    else:
        (cf, c0, c1), (sf, s0, s1) = task["class"], task["spurious"]
        flags = ["--world_class_field", cf, "--world_class_values", c0, c1, "--world_spurious_field", sf,
                 "--world_spurious_values", s0, s1, "--world_correlation", str(GENERATED_CORRELATION)]
        sizes = QUICK_SIZES if quick else GENERATED_SIZES
    if sizes:
        flags += ["--world_train_size", str(sizes[0]), "--world_val_size", str(sizes[1]), "--world_test_size", str(sizes[2])]
    return flags


def registered_methods() -> list[str]:
    """Every registered non-baseline method (the world has class and group labels and all splits)."""
    from clip_robust_plugins.plugins import build_plugin_manager, collect_registry

    registry = collect_registry(build_plugin_manager())
    return sorted(name for name, spec in registry.mitigations.items() if not spec.baseline)


def task_methods(name: str, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """``--mitigation`` of a task and the methods left out of it for cost, with the reason."""
    if args.methods != ["all_baselines"] or args.quick:
        return list(args.methods), {}
    if "methods" in TASKS[name]:
        return list(TASKS[name]["methods"]), {}
    registered = registered_methods()
    if TASKS[name].get("costly"):
        return [m for m in COSTLY if m in registered], {}
    costly = f"{name}_costly"
    why = f"run at seed {args.seeds[0]} only, as {costly}" if costly in TASKS else "left out of this task for cost"
    return [m for m in registered if m not in COSTLY], {m: why for m in COSTLY if m in registered}


def task_seeds(name: str, args: argparse.Namespace) -> list[int]:
    return args.seeds[:1] if TASKS[name].get("costly") else list(args.seeds)


def task_pretrained(name: str, args: argparse.Namespace) -> str:
    return TASKS[name].get("pretrained", args.pretrained)


def eval_command(name: str, args: argparse.Namespace) -> list[str]:
    work = Path(args.work_dir)
    methods, _ = task_methods(name, args)
    return [sys.executable, "-m", "clip_robust_plugins.cli", "eval", "--dataset", "robust/clipworld",
            *task_flags(name, args.quick), "--model", args.model, "--pretrained", task_pretrained(name, args),
            *TASKS[name].get("flags", ()), "--mitigation", *methods, "--seed", *map(str, task_seeds(name, args)),
            "--output", str(work / name / "{seed}.json"), "--dataset_root", str(work / "data"),
            *(["--feature_cache", args.feature_cache] if args.feature_cache else []), "--num_workers", "0", "--quiet"]


def run_task(name: str, args: argparse.Namespace) -> dict:
    """Run one task (all seeds in one process) unless its JSONs exist; returns its run record."""
    folder = Path(args.work_dir) / name
    record_path = folder / "run.json"
    outputs = [folder / f"{seed}.json" for seed in task_seeds(name, args)]
    if all(p.exists() for p in outputs) and record_path.exists():
        print(f"{name}: results exist, not run again", file=sys.stderr)
        return json.loads(record_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    command = eval_command(name, args)
    print(f"{name}: {shlex.join(command)}", file=sys.stderr)
    start = time.perf_counter()
    log = folder / "eval.log"
    with open(log, "w") as stream:
        proc = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: eval failed (exit {proc.returncode}); see {log}:\n{text[-2000:]}")
    skipped = dict(task_methods(name, args)[1])
    for line in text.splitlines():
        match = SKIP_NOTE.match(line.strip())
        if match:
            skipped[match.group(1)] = match.group(2)
    record = {"task": name, "seconds": round(seconds, 1), "command": command, "skipped": skipped,
              "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    record_path.write_text(json.dumps(record, indent=1))
    return record


def run_report(files: list[str], out: str, cwd: Path) -> str:
    """``clip_benchmark_robust report`` over ``files`` (relative to ``cwd``); returns report.md."""
    command = [sys.executable, "-m", "clip_robust_plugins.cli", "report", *files, "--output_dir", out]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"report failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return (cwd / out / "report.md").read_text()


def leaderboards(markdown: str) -> dict[str, list[str]]:
    """Task -> the leaderboard table lines of its section in a report.md (tasks named by the
    results files' first path component, as listed under the section's commands)."""
    tables: dict[str, list[str]] = {}
    for section in re.split(r"^## ", markdown, flags=re.M)[1:]:
        lines = section.splitlines()
        if "### Leaderboard" not in lines:
            continue
        start = lines.index("### Leaderboard") + 2
        table = []
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            table.append(line)
        files = re.findall(r"^(\S+?)/[^/\s]+\.json \(seed", section, flags=re.M)
        for task in set(files):
            tables[task] = table
    return tables


def rows_of(table: list[str], pretrained: str) -> list[str]:
    """The header and the rows of one checkpoint (a report section holds every model run on its dataset)."""
    return table[:2] + [line for line in table[2:] if line.strip("|").split("|")[1].strip() == pretrained]


def worst_cells(table: list[str]) -> dict[str, str]:
    """Method -> its worst-group cell, read from a leaderboard table."""
    header = [c.strip() for c in table[0].strip("|").split("|")]
    col = next(i for i, c in enumerate(header) if c.startswith("worst"))
    cells = {}
    for line in table[2:]:
        row = [c.strip() for c in line.strip("|").split("|")]
        cells[row[2]] = row[col]
    return cells


def checkpoint_digest() -> str:
    return hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() if CHECKPOINT.exists() else "missing"


def checkpoint_id() -> str:
    return f"`{CHECKPOINT.name}` (sha256 {checkpoint_digest()[:16]}…)"


def methods_ran(folder: Path, seed: int) -> list[str]:
    doc = json.loads((folder / f"{seed}.json").read_text())
    return list(doc["robust"]["methods"])


def write_markdown(args: argparse.Namespace, records: dict[str, dict], all_md: str, first_md: str) -> str:
    work = Path(args.work_dir)
    mean_tables, first_tables = leaderboards(all_md), leaderboards(first_md)
    for tables in (mean_tables, first_tables):
        for name in tables:
            tables[name] = rows_of(tables[name], task_pretrained(name, args))
    seeds = " ".join(map(str, args.seeds))
    lines = ["# Every method in the CLIP-like world", "",
             f"Produced by `python3 scripts/world_results.py {shlex.join(args.argv)}`".rstrip() + " "
             f"on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}; model `{args.model}` / `{args.pretrained}` "
             f"{checkpoint_id()}; test split; run seeds {seeds} (one process per task, features shared between seeds, "
             "so the seeds change the methods' own randomness and the bootstrap, not the data). Every cell is copied "
             "from `clip_benchmark_robust report`: the first table of each task is the report over all seeds "
             f"(`mean ± std` over the seeds), the second the report over seed {args.seeds[0]} alone "
             "(`value [low, high]`: 95% percentile bootstrap within groups, paired with zero-shot for the difference). "
             "Times are wall-clock on a shared 2-core CPU machine with other jobs running: not clean measurements.", ""]
    if args.quick:
        lines += ["**Quick mode: every split shrunk to "
                  f"{'/'.join(map(str, QUICK_SIZES))} images; a smoke test, not a measurement.**", ""]
    lines += ["Generated tasks: train correlation "
              f"{GENERATED_CORRELATION}, balanced val/test, data seed 0; split sizes "
              f"{'/'.join(map(str, QUICK_SIZES if args.quick else GENERATED_SIZES))} (train/val/test). "
              "Presets keep their own settings (docs/datasets.md).", ""]
    lines += _summary(records, mean_tables)
    for name, record in records.items():
        folder = work / name
        lines += [f"## {name}", "", f"Flags: `{shlex.join(task_flags(name, args.quick))}`; wall time "
                  f"{record['seconds']:.0f} s for {len(task_seeds(name, args))} seed(s) (finished {record['finished']}).", ""]
        if task_pretrained(name, args) != args.pretrained:
            lines += [f"Model: `--pretrained {task_pretrained(name, args)}` (evaluated, and RaVL's discovery); "
                      f"extra flags `{shlex.join(TASKS[name].get('flags', ()))}`.", ""]
        ran = methods_ran(folder, args.seeds[0])
        lines += [f"Ran ({len(ran)}): {', '.join(ran)}."]
        if record.get("skipped"):
            lines += ["Left out: " + "; ".join(f"{m} ({why})" for m, why in record["skipped"].items()) + "."]
        if TASKS[name].get("costly"):
            base = name.removesuffix("_costly")
            lines += ["", f"Its rows are in the tables of {base} (same data, same features).", "",
                      "Command:", "", "    " + shlex.join(_relative(record["command"])), ""]
            continue
        lines += ["", f"Seeds {' '.join(map(str, task_seeds(name, args)))}:", "", *mean_tables.get(name, ["(no table)"]), "",
                  f"Seed {args.seeds[0]}, with intervals:", "", *first_tables.get(name, ["(no table)"]), "",
                  "Command:", "", "    " + shlex.join(_relative(record["command"])), ""]
    return "\n".join(lines) + "\n"


def _summary(records: dict[str, dict], tables: dict[str, list[str]]) -> list[str]:
    """Worst-group accuracy of every method on every task (cells from the all-seeds reports)."""
    cells = {name: worst_cells(tables[name]) for name in records if name in tables and not TASKS[name].get("costly")}
    methods = list(dict.fromkeys(m for c in cells.values() for m in c))
    lines = ["## Worst-group accuracy, all tasks", "", "| method | " + " | ".join(cells) + " |",
             "|---|" + "--:|" * len(cells)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(c.get(method, "-") for c in cells.values()) + " |")
    return lines + [""]


def _relative(command: list[str]) -> list[str]:
    return ["python3" if part == sys.executable else part for part in command]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--work_dir", default=None, help="default results/world/<checkpoint sha256 prefix>")
    p.add_argument("--feature_cache", default=None, help="eval's --feature_cache (default: eval's own)")
    p.add_argument("--output", default="docs/results.md")
    p.add_argument("--methods", nargs="+", default=["all_baselines"], help="--mitigation of every eval")
    p.add_argument("--model", default="crp-world")
    p.add_argument("--pretrained", default="clipworld")
    p.add_argument("--quick", action="store_true", help=f"every split {'/'.join(map(str, QUICK_SIZES))} images (a test)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.work_dir is None:
        args.work_dir = str(Path("results") / "world" / checkpoint_digest()[:12])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(args.work_dir)
    records = {name: run_task(name, args) for name in args.tasks}
    everything = [f"{name}/{seed}.json" for name in args.tasks for seed in task_seeds(name, args)]
    first = [f"{name}/{args.seeds[0]}.json" for name in args.tasks]
    all_md = run_report(everything, "report_all", work)
    first_md = run_report(first, f"report_seed{args.seeds[0]}", work)
    text = write_markdown(args, records, all_md, first_md)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
