"""Many seeds in one process against one process per seed, on warm features.

    python3 bench/bench_seeds.py                  # zero-shot + DFR + CFR, seeds 0 1 2, 3 repetitions
    python3 bench/bench_seeds.py --repeats 5 --mitigation dfr cfr

``robust/spurious_shapes`` at its defaults (2,000 / 400 / 400 images, 32 px) and the shipped
``crp-tiny`` checkpoint; one warm-up eval generates the data and fills the feature cache, then each repetition runs,
alternated: three separate ``eval --seed S`` processes, and one ``eval --seed 0 1 2 --output
'one/{seed}.json'``.  Reports the wall of each and the ratio (target <= 0.5), checks that every
seed's metrics agree between the two ways, and writes ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval as be  # noqa: E402 - console scripts, data generation, machine info


def metrics_of(path: Path) -> dict:
    """Every method's per-group metrics of one results JSON (what must agree between the two ways)."""
    return {m: r.get("metrics") for m, r in json.loads(path.read_text())["robust"]["methods"].items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mitigation", nargs="+", default=["dfr", "cfr"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).with_name("results_seeds.json")))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_seeds_"))
    robust = be.console_script("clip_benchmark_robust")
    common = [robust, "eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(work / "data"),
              "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--feature_cache", str(work / "features"),
              "--num_workers", "0", "--batch_size", "256", "--mitigation", *args.mitigation, "--quiet"]
    be.run_timed([*common, "--seed", str(args.seeds[0]), "--output", str(work / "warmup.json")], label="warm-up")
    info = {**be.machine_info(), "load_avg_start": be.load_avg()}
    rows = []
    for rep in range(args.repeats):
        separate = 0.0
        for seed in args.seeds:
            out = work / f"sep{rep}" / f"{seed}.json"
            separate += be.run_timed([*common, "--seed", str(seed), "--output", str(out)], label=f"seed {seed}")[0]
        seeds = [str(s) for s in args.seeds]
        one, _ = be.run_timed([*common, "--seed", *seeds, "--output", str(work / f"one{rep}" / "{seed}.json")], label="one")
        same = all(metrics_of(work / f"sep{rep}" / f"{s}.json") == metrics_of(work / f"one{rep}" / f"{s}.json")
                   for s in args.seeds)
        rows.append({"separate_s": round(separate, 2), "one_s": round(one, 2), "ratio": round(one / separate, 3),
                     "metrics_equal": same, "load_avg": be.load_avg()})
        print(f"repetition {rep + 1}: {len(args.seeds)} separate {separate:.1f} s, one process {one:.1f} s, "
              f"ratio {one / separate:.3f} (target <= 0.5), metrics equal: {same}", flush=True)
    ratios = [r["ratio"] for r in rows]
    result = {"script": "bench/bench_seeds.py", "settings": vars(args), "machine": info, "rows": rows,
              "median_ratio": statistics.median(ratios), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"median ratio {statistics.median(ratios):.3f} (moved {min(ratios):.3f}-{max(ratios):.3f}); wrote {args.output}")
    return 0 if all(r["metrics_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
