"""RaVL discovery at scale: wall time and peak RSS of the clustering-and-scoring step.

Each size runs in a fresh subprocess (peak RSS = that process's ``ru_maxrss``, data
included) on synthetic unit 512-d region embeddings (4 regions per image, two classes,
a planted "patch" direction that flips predictions), so the curve shows how the step
grows with the number of regions.  Above ``--ravl_max_cluster_regions`` (10,000 by
default) clustering is sampled (CLARA-style); at or below it, exact.

    python3 bench/bench_discovery.py                      # 5k, 20k, 80k, 320k regions
    python3 bench/bench_discovery.py --sizes 5000 20000 --output results_discovery.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (5_000, 20_000, 80_000, 320_000)
DIM = 512
REGIONS_PER_IMAGE = 4


def synthetic(n_regions: int, seed: int = 0):
    """(N, 4, D) float32 unit embeddings, valid, y, pred, region scores; generated in chunks (no float64 copy)."""
    rng = np.random.default_rng(seed)
    n_images = n_regions // REGIONS_PER_IMAGE
    centres = rng.normal(size=(8, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, 2, n_images)
    patch = rng.random(n_images) < 0.5
    assign = rng.integers(1, 8, (n_images, REGIONS_PER_IMAGE))
    assign[patch, 0] = 0  # centre 0 is the planted patch
    emb = np.empty((n_images, REGIONS_PER_IMAGE, DIM), dtype=np.float32)
    for start in range(0, n_images, 4096):
        block = centres[assign[start:start + 4096]]
        block += 0.6 * rng.standard_normal(block.shape, dtype=np.float32) / np.sqrt(DIM)
        block /= np.linalg.norm(block, axis=-1, keepdims=True)
        emb[start:start + 4096] = block
    pred = np.where(patch, 1, y)
    pred = np.where(rng.random(n_images) < 0.1, 1 - pred, pred)
    scores = np.full((n_images, REGIONS_PER_IMAGE, 2), 0.5, dtype=np.float32)
    scores[patch, 0, 1] = 0.9
    scores[patch, 0, 0] = 0.1
    valid = np.ones((n_images, REGIONS_PER_IMAGE), dtype=bool)
    return emb, valid, y, pred, scores


def run_one(n_regions: int, cap: int, draws: int) -> dict:
    from clip_robust_plugins.mitigations.ravl.configs import DiscoveryConfig
    from clip_robust_plugins.mitigations.ravl.discovery import discover_from_embeddings

    emb, valid, y, pred, scores = synthetic(n_regions)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = DiscoveryConfig(max_cluster_regions=cap, cluster_draws=draws)
    t0 = time.perf_counter()
    result = discover_from_embeddings(emb, valid, y, pred, scores, 2, config, seed=0)
    wall = time.perf_counter() - t0
    top = result.top_cluster
    planted = None
    if top is not None:
        ranked = result.region_ids[result.ranked_regions[top][:10]]
        planted = float(np.mean(ranked[:, 1] == 0))  # region 0 of a patch image is the planted one
    return {"regions": int(valid.sum()), "wall_s": round(wall, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_data_mb": round(rss_data, 1), "k": result.clustering.k,
            "mode": "sampled" if result.clustering.sampled else "exact", "sample_size": result.clustering.sample_size,
            "draws": result.clustering.draws, "top_cluster_planted@10": planted}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--cap", type=int, default=10_000, help="--ravl_max_cluster_regions")
    p.add_argument("--draws", type=int, default=1, help="--ravl_cluster_draws")
    p.add_argument("--output", default=str(Path(__file__).with_name("results_discovery.json")))
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.cap, args.draws)))
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--cap", str(args.cap), "--draws",
                              str(args.draws)], capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            sys.exit(f"size {n} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['regions']:>8} regions  {r['mode']:>7}  wall {r['wall_s']:>7.1f} s  peak RSS {r['peak_rss_mb']:>7.0f} MB "
              f"(data {r['rss_after_data_mb']:.0f} MB)  k={r['k']}  planted@10={r['top_cluster_planted@10']}", flush=True)
    meta = {"cpus": os.cpu_count(), "dim": DIM, "cap": args.cap, "draws": args.draws}
    Path(args.output).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n| regions | clustering | wall (s) | peak RSS (MB) |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['regions']:,} | {r['mode']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
