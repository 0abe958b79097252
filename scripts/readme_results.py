"""The README's results table, reproducible with one command.

    python3 scripts/readme_results.py                       # seeds 0 1 2 into results/readme/
    python3 scripts/readme_results.py --seeds 0 --work_dir /tmp/r

Runs the offline demo (robust/spurious_shapes at its defaults, crp-tiny/spurious_shapes,
every registered method with its demo settings, CPU fp32) once per run seed, then
``clip_benchmark_robust report`` over the results; the README quotes ``report.md``'s table.
The data (data seed 0) and features are shared between seeds, so the seeds change only the
methods' own randomness and the bootstrap.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work_dir", default="results/readme")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    cli = [sys.executable, "-m", "clip_robust_plugins.cli"]
    for seed in args.seeds:
        out = work / f"seed{seed}"
        subprocess.run([*cli, "demo", "--output_dir", str(out), "--feature_cache", str(work / "features"),
                        "--dataset_root", str(work / "data"), "--seed", str(seed), "--quiet"], check=True)
    results = [str(work / f"seed{seed}" / "results.json") for seed in args.seeds]
    subprocess.run([*cli, "report", *results, "--output_dir", str(work / "report")], check=True)
    print((work / "report" / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
