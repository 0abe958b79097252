#!/usr/bin/env python3
"""Memory benchmark: peak RSS of ``clip_benchmark_robust eval`` at N and 4N test images.

Run by hand from the repository root (never by the tests)::

    python3 bench/bench_memory.py                    # N = 2000, 128 px images, about 4 min on 2 CPUs
    python3 bench/bench_memory.py --n 500 --image_size 64   # a quick look
    python3 bench/bench_memory.py --n 1024 --image_size 224 --model ViT-S-32 --repeats 1   # a real tower's activations

What it shows: evaluation streams images from the shards, so its memory grows with the
*stored features* (N x D floats per kind) and not with the images.  In one run it

1. generates ``robust/spurious_shapes`` twice into a work dir, with ``--n`` and ``4 * --n``
   test images (train/val kept small: only the test split is evaluated) at
   ``--image_size`` pixels, so that keeping the decoded images would be visible;
2. runs ``clip_benchmark_robust eval`` (zero-shot, the shipped ``crp-tiny`` model,
   ``--no_feature_cache`` so the extraction really runs) once per size, each in a fresh
   process, in-process DataLoader (``--num_workers 0``: every byte is the measured
   process's), and records that process's peak resident set size (``ru_maxrss``), the
   median over ``--repeats`` fresh processes (start-up and allocator noise is ~100 MiB);
3. also runs a **baseline** in the same run, at N and 4N: a script that decodes every
   test image into memory, which is what a non-streaming reader would hold;
4. prints a table and writes ``--output`` (default ``bench/results_memory.json``):
   peak RSS at N and 4N, their ratio, the growth per added sample for our eval and for
   the baseline (and their ratio), and the bytes of one feature row and of one decoded
   image for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNNER = r"""
import resource, sys
from clip_robust_plugins import cli
rc = cli.main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""

MATERIALISE = r"""
import resource, sys
import numpy as np
from clip_robust_plugins.datasets.wds import GroupedShards
images = [np.asarray(img.convert("RGB")) for _key, img, _fields in GroupedShards(sys.argv[1]).samples("test", None)]
print("IMAGES", len(images), sum(a.nbytes for a in images), flush=True)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def generate(root: Path, n: int, image_size: int) -> None:
    from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate

    if not (root / "groups.json").is_file():
        generate(root, ShapesConfig(train_size=64, val_size=32, test_size=n, image_size=image_size), progress=True)


def peak_rss(cmd: list[str], repeats: int = 1) -> tuple[float, float, str]:
    """Median peak RSS (MiB) and seconds over ``repeats`` fresh processes (allocator noise is ~100 MiB)."""
    runs = [_peak_rss_once(cmd) for _ in range(repeats)]
    mib = statistics.median(r[0] for r in runs)
    seconds = statistics.median(r[1] for r in runs)
    return mib, seconds, runs[-1][2]


def _peak_rss_once(cmd: list[str]) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KB"))
    return int(line.split()[1]) / 1024.0, seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="test images in the small run (the large one has 4x)")
    parser.add_argument("--image_size", type=int, default=128, help="stored image side in pixels")
    parser.add_argument("--work_dir", default=None, help="where shards go (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (median)")
    parser.add_argument("--model", default="crp-tiny",
                        help="crp-tiny (shipped weights, batch 256) or an open_clip architecture (random init, batch 64)")
    parser.add_argument("--output", default="bench/results_memory.json")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="crp_bench_memory_"))
    sizes = {"N": args.n, "4N": 4 * args.n}
    model_flags = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--batch_size", "256"]
    if args.model != "crp-tiny":  # a real tower's activations (above glibc's mmap threshold) show heap growth
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_eval

        checkpoint = work / f"{args.model}_random.safetensors"
        if not checkpoint.is_file():
            bench_eval.save_random_checkpoint(args.model, checkpoint)
        model_flags = ["--model", args.model, "--pretrained", str(checkpoint), "--batch_size", "64"]
    rows = {}
    for label, n in sizes.items():
        root = work / f"shapes_{n}_{args.image_size}"
        generate(root, n, args.image_size)
        cmd = [
            sys.executable, "-c", RUNNER, "eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(root),
            "--shapes_train_size", "64", "--shapes_val_size", "32", "--shapes_test_size", str(n),
            "--shapes_image_size", str(args.image_size), *model_flags,
            "--no_amp", "--no_feature_cache", "--num_workers", "0", "--quiet",
            "--output", str(work / f"results_{n}.json"),
        ]
        mib, seconds, _ = peak_rss(cmd, args.repeats)
        rows[label] = {"n": n, "peak_rss_mib": round(mib, 1), "seconds": round(seconds, 2)}
        print(f"{label:>3} = {n:6d} images: peak RSS {mib:8.1f} MiB ({seconds:.1f} s)", flush=True)
    for label, n in sizes.items():
        root = work / f"shapes_{n}_{args.image_size}"
        mib, seconds, out = peak_rss([sys.executable, "-c", MATERIALISE, str(root)], args.repeats)
        image_bytes = int(next(line for line in out.splitlines() if line.startswith("IMAGES")).split()[2])
        rows[f"baseline_{label}"] = {"n": n, "peak_rss_mib": round(mib, 1), "seconds": round(seconds, 2),
                                     "decoded_image_bytes": image_bytes}
        print(f"baseline {label:>3} (decoded images held): peak RSS {mib:8.1f} MiB", flush=True)

    def growth(prefix: str) -> float:
        return (rows[f"{prefix}4N"]["peak_rss_mib"] - rows[f"{prefix}N"]["peak_rss_mib"]) * 2**20 / (sizes["4N"] - sizes["N"])

    # the embedding width (crp-tiny's is 64): zero-shot stores one image feature row per sample
    feature_dim = 64
    if args.model != "crp-tiny":
        import open_clip

        feature_dim = open_clip.get_model_config(args.model)["embed_dim"]
    result = {
        "rows": rows,
        "ratio_peak_rss_4N_over_N": round(rows["4N"]["peak_rss_mib"] / rows["N"]["peak_rss_mib"], 3),
        "growth_bytes_per_added_sample": round(growth(""), 1),
        "baseline_growth_bytes_per_added_sample": round(growth("baseline_"), 1),
        "ratio_growth_streaming_over_baseline": round(growth("") / growth("baseline_"), 4),
        "feature_row_bytes": feature_dim * 4,
        "decoded_image_bytes": rows["baseline_4N"]["decoded_image_bytes"] // sizes["4N"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg": os.getloadavg()},
        "args": vars(args),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "machine", "args")}, indent=1))
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
