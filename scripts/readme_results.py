"""The README's results table, reproducible with one command.

    python3 scripts/readme_results.py                       # seeds 0 1 2 into results/readme/
    python3 scripts/readme_results.py --seeds 0 --work_dir /tmp/r

Runs the offline demo's eval (robust/spurious_shapes at its defaults, crp-tiny/spurious_shapes,
every built-in method with its demo settings, CPU fp32) once, for every run seed at once
(``--seed 0 1 2``: the data, data seed 0, and the features are shared, so the seeds change
only the methods' own randomness and the bootstrap), then ``clip_benchmark_robust report``
over the per-seed results; the README quotes ``report.md``'s table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def eval_argv(work: Path, seeds: list[int]) -> list[str]:
    """The demo's eval command line, with its outputs under ``work`` and every seed in one run."""
    from clip_robust_plugins.cli import demo_eval_argv
    from clip_robust_plugins.plugins import build_plugin_manager, collect_registry

    registry = collect_registry(build_plugin_manager())
    argv = demo_eval_argv(str(work), registry)
    return [*argv, "--output", str(work / "seed{seed}" / "results.json"), "--seed", *map(str, seeds), "--quiet"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work_dir", default="results/readme")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    cli = [sys.executable, "-m", "clip_robust_plugins.cli"]
    t0 = time.perf_counter()
    subprocess.run([*cli, *eval_argv(work, args.seeds)], check=True)
    print(f"readme_results: eval of {len(args.seeds)} seeds took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    results = [str(work / f"seed{seed}" / "results.json") for seed in args.seeds]
    subprocess.run([*cli, "report", *results, "--output_dir", str(work / "report")], check=True)
    print((work / "report" / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
