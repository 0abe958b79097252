"""What the intervals add to a run: Wilson + the paired within-group bootstrap on a synthetic split.

usage: python bench/bench_intervals.py [--samples 20000] [--methods 8] [--bootstrap_samples 1000] [--repeats 5]

Waterbirds-like test split (4 groups, 24/26/26/24 % of the samples, the per-method accuracies
vary by group); prints JSON with the median wall time of ``add_method_intervals`` and, for
scale, of computing ``metrics.group_metrics`` for every method.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from clip_robust_plugins.intervals import add_method_intervals
from clip_robust_plugins.metrics import group_metrics
from clip_robust_plugins.results import MethodResult


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--methods", type=int, default=8)
    parser.add_argument("--bootstrap_samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    names = ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water"]
    groups = rng.choice(4, size=args.samples, p=[0.24, 0.26, 0.26, 0.24])
    y = (groups >= 2).astype(np.int64)
    train_counts = [3498, 184, 56, 1057]
    accs = rng.uniform(0.55, 0.98, size=(args.methods, 4))
    preds = [np.where(rng.random(args.samples) < accs[m][groups], y, 1 - y) for m in range(args.methods)]

    def metrics_only():
        return [group_metrics(p, y, groups, names, train_counts) for p in preds]

    def intervals():
        methods = [MethodResult(f"m{m}", None, preds[m], {}) for m in range(args.methods)]
        add_method_intervals(methods, y, groups, names, train_counts, args.bootstrap_samples, 0.95, args.seed)

    timings = {}
    for name, fn in (("group_metrics_all_methods", metrics_only), ("add_method_intervals", intervals)):
        fn()  # warm-up
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        timings[name] = {"median_s": round(statistics.median(runs), 4), "max_s": round(max(runs), 4)}
    print(json.dumps({
        "samples": args.samples, "methods": args.methods, "groups": 4, "bootstrap_samples": args.bootstrap_samples,
        "seed": args.seed, "repeats": args.repeats, "numpy": np.__version__, "python": platform.python_version(),
        "timings": timings,
    }, indent=1))


if __name__ == "__main__":
    main()
