"""Seconds and peak memory of fitting every linear-head method on synthetic cached features.

Run by hand (never by the tests), from the repository root::

    python3 bench/bench_heads.py                  # 20,000 train x 768 (val/test 5,000)
    python3 bench/bench_heads.py --celeba         # also 200,000 train x 768 (val/test 20,000)
    python3 bench/bench_heads.py --methods afr jtt_head --sizes 20000:5000

The features mimic CLIP embeddings of a spurious-correlation benchmark: 2 classes x 2 values
of a spurious attribute, L2-normalised 768-d vectors with a weak, noisy class direction and
a strong, clean spurious direction; train is 95% correlated (the minority groups hold 5%),
val and test are group-balanced.  Every method is created from its registered spec with its
default config (the flags' defaults) and fitted through the same ``fit`` / ``predict`` the
engine calls, on an in-memory context (no model, no images).  Each step's wall seconds and
the peak resident memory during it (sampled every 5 ms from /proc/self/statm: the
process's peak, and its increase over the resident memory before the step) go to ``--output``, with the
test worst-group accuracy as a sanity check and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

DEFAULT_METHODS = ["erm_head", "dfr", "dfr_train", "dfr_labelfree", "group_dro_head", "jtt_head", "afr",
                   "class_balanced_head"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory while the block runs (a sampling thread)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def increase_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def synthetic_split(n: int, dim: int, seed: int, minority: float | None, prefix: str):
    """A FeatureSet: groups (y, a); ``minority`` None means group-balanced."""
    import torch

    from clip_robust_plugins import FeatureSet, two_field_schema

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = rng.integers(0, 2, n) if minority is None else np.where(rng.random(n) < minority, 1 - y, y)
    basis = np.linalg.qr(np.random.default_rng(12345).normal(size=(dim, 2)))[0].astype(np.float32)
    x = rng.standard_normal((n, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    x += np.outer(0.15 * (2 * y - 1) + 0.15 * rng.standard_normal(n), basis[:, 0]).astype(np.float32)
    x += np.outer(0.4 * (2 * a - 1), basis[:, 1]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    schema = two_field_schema(["landbird", "waterbird"], ["land", "water"])
    keys = tuple(f"{prefix}{i:07d}" for i in range(n))
    return FeatureSet(keys, torch.from_numpy(x), torch.from_numpy(np.stack([y, a], 1)), schema)


class BenchContext:
    """What a linear head reads from the engine's RunContext, over in-memory features."""

    def __init__(self, splits, seed: int = 0):
        from clip_robust_plugins import RunContext

        self._splits, self.seed, self.eval_split = splits, seed, "test"
        self.schema = splits["train"].schema
        self.classnames = list(self.schema.classnames)
        self._rng = RunContext.rng

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def rng(self, salt: str):
        return self._rng(self, salt)

    def features(self, split: str, kind: str = "image"):
        return self._splits[split]


def run_size(n_train: int, n_eval: int, dim: int, methods: list[str], registry) -> dict:
    from clip_robust_plugins.metrics import worst_group_accuracy

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        splits = {"train": synthetic_split(n_train, dim, 0, 0.05, "tr"),
                  "val": synthetic_split(n_eval, dim, 1, None, "va"),
                  "test": synthetic_split(n_eval, dim, 2, None, "te")}
    rows = {"features": {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_increase_mb": mem.increase_mb,
                         "rss_after_mb": round(rss_bytes() / 2**20, 1)}}
    test = splits["test"]
    y, g = test.y.numpy(), test.group_ids().numpy()
    for name in methods:
        spec = registry.mitigation(name)
        method = spec.create(spec.options() if spec.options is not None else argparse.Namespace())
        ctx = BenchContext(splits)
        t0 = time.perf_counter()
        with PeakRSS() as fit_mem:
            method.fit(ctx)
        t1 = time.perf_counter()
        with PeakRSS() as predict_mem:
            logits = method.predict(ctx, "test")
        t2 = time.perf_counter()
        pred = logits.argmax(1).numpy()
        hp = method.hyperparameters()
        rows[name] = {
            "fit_seconds": round(t1 - t0, 3), "fit_peak_rss_increase_mb": fit_mem.increase_mb,
            "fit_peak_rss_mb": fit_mem.peak_mb,
            "predict_seconds": round(t2 - t1, 3), "predict_peak_rss_increase_mb": predict_mem.increase_mb,
            "test_worst_group_acc": round(worst_group_accuracy(pred, y, g), 4),
            "test_acc": round(float((pred == y).mean()), 4),
            "chosen": hp.get("chosen", {"C": hp["C"]} if "selection_worst_group_acc" in hp else None),
        }
        print(f"{n_train:>7} x {dim}  {name:<20} fit {rows[name]['fit_seconds']:8.2f} s  "
              f"+{rows[name]['fit_peak_rss_increase_mb']:7.1f} MB  predict {rows[name]['predict_seconds']:.3f} s  "
              f"test WGA {rows[name]['test_worst_group_acc']:.3f}", flush=True)
    rows["process_peak_rss_mb"] = round(rss_bytes() / 2**20, 1)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--celeba", action="store_true", help="also 200,000 train / 20,000 val and test (CelebA scale)")
    p.add_argument("--sizes", nargs="+", default=None, metavar="TRAIN:EVAL", help="sizes to run (default 20000:5000)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--output", default="bench/results_heads.json")
    args = p.parse_args()

    import torch

    from clip_robust_plugins.plugins import build_plugin_manager, collect_registry

    registry = collect_registry(build_plugin_manager())
    sizes = args.sizes or ["20000:5000"] + (["200000:20000"] if args.celeba else [])
    machine = {
        "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "note": "measured on a shared machine: other jobs ran at the same time, so seconds are upper bounds",
    }
    results = {"command": "python3 bench/bench_heads.py" + (" --celeba" if args.celeba else ""), "machine": machine,
               "dim": args.dim, "sizes": {}}
    for size in sizes:
        n_train, n_eval = (int(v) for v in size.split(":"))
        results["sizes"][f"{n_train}x{args.dim}"] = {"train": n_train, "val": n_eval, "test": n_eval,
                                                      **run_size(n_train, n_eval, args.dim, args.methods, registry)}
    machine["load_average_after"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
