"""Measure the README's results table: mean ± std over run seeds, one eval per seed.

Reproduce (CPU, offline; the dataset is generated once into --work_dir)::

    python3 scripts/results_table.py --mitigation erm_head dfr dfr_train cfr --seeds 0 1 2

Every seed runs ``clip_benchmark_robust eval`` on ``robust/spurious_shapes`` (default
flags: 2000/400/400 images, correlation 0.95, data seed 0) with the shipped tiny model
``crp-tiny``/``spurious_shapes`` and ``--seed SEED``; image features are cached once and
shared by all seeds, so the seeds differ only in what the mitigations draw (DFR's
subsamples, CFR's initialisation and batches).  Prints a Markdown table of worst-group
accuracy and the averages, and writes the per-seed metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from clip_robust_plugins import cli

COLUMNS = (
    ("worst-group acc", "worst_group_acc"),
    ("acc (sample mean)", "acc"),
    ("acc (train-weighted)", "acc_train_weighted"),
)


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.work_dir) / f"seed{seed}.json"
    argv = [
        "eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(Path(args.work_dir) / "data"),
        "--model", args.model, "--pretrained", args.pretrained, "--seed", str(seed),
        "--feature_cache", str(Path(args.work_dir) / "features"), "--output", str(out),
        "--num_workers", "0", "--no_amp", "--quiet", *args.extra,
    ]
    if args.mitigation:
        argv += ["--mitigation", *args.mitigation]
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"eval failed for seed {seed} (exit {rc})")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mitigation", nargs="*", default=["erm_head", "dfr", "dfr_train"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--model", default="crp-tiny")
    p.add_argument("--pretrained", default="spurious_shapes")
    p.add_argument("--work_dir", default="results_table_work")
    p.add_argument("--output", default="results_table.json")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further eval flags after --")
    args = p.parse_args()
    args.extra = [a for a in args.extra if a != "--"]

    t0 = time.perf_counter()
    dumps = {seed: run_seed(seed, args) for seed in args.seeds}
    seconds = time.perf_counter() - t0
    methods = list(next(iter(dumps.values()))["robust"]["methods"])
    table = {}
    for method in methods:
        table[method] = {}
        for _, key in COLUMNS:
            values = [d["metrics"][f"{method}/{key}"] for d in dumps.values()]
            table[method][key] = (statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)

    print(f"robust/spurious_shapes test split, {args.model}/{args.pretrained}, seeds {args.seeds} (mean ± std)\n")
    print("| method | " + " | ".join(label for label, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for method in methods:
        cells = [f"{table[method][key][0]:.3f} ± {table[method][key][1]:.3f}" for _, key in COLUMNS]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print(f"\n{len(args.seeds)} evals in {seconds:.1f} s")
    Path(args.output).write_text(
        json.dumps({"seeds": args.seeds, "seconds": seconds, "table": table,
                    "metrics": {s: d["metrics"] for s, d in dumps.items()}}, indent=1)
    )


if __name__ == "__main__":
    main()
