"""What the group scores (ECE, precision/F1, AUROC per group, with bootstrap intervals) cost per method.

usage: python bench/bench_group_scores.py [--samples 20000] [--bootstrap_samples 1000] [--repeats 3]

Waterbirds-like two-class test split (class x attribute groups, attribute agreeing with the
class 80 % of the time, continuous scores, so about as many distinct scores as samples: the
AUROC's worst case); prints JSON with the median wall time of one method's ``group_scores``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from clip_robust_plugins.group_scores import GroupScoresConfig, group_scores
from clip_robust_plugins.groups import two_field_schema
from clip_robust_plugins.specs import Predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--bootstrap_samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    y = rng.integers(0, 2, args.samples)
    a = np.where(rng.random(args.samples) < 0.8, y, 1 - y)
    p1 = np.clip(0.15 + 0.5 * y + 0.25 * a + rng.normal(0, 0.15, args.samples), 0.01, 0.99)
    logits = np.stack([np.log(1 - p1), np.log(p1)], axis=1)
    schema = two_field_schema(["landbird", "waterbird"], ["land", "water"])
    preds = Predictions("m", "test", tuple(map(str, range(args.samples))), logits.argmax(1), np.stack([y, a], 1),
                        schema, logits)
    config = GroupScoresConfig(bootstrap_samples=args.bootstrap_samples)
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        group_scores(preds, config, seed=args.seed)
        runs.append(time.perf_counter() - t0)
    print(json.dumps({
        "samples": args.samples, "groups": 4, "bootstrap_samples": args.bootstrap_samples, "seed": args.seed,
        "repeats": args.repeats, "numpy": np.__version__, "python": platform.python_version(),
        "group_scores_one_method": {"median_s": round(statistics.median(runs), 3), "max_s": round(max(runs), 3)},
    }, indent=1))


if __name__ == "__main__":
    main()
