"""Start-up and warm-run walls of ``clip_benchmark_robust`` against ``clip_benchmark`` in one run.

    python3 bench/bench_startup.py                 # 5 repeats, about 3 minutes on an idle 2-CPU machine
    python3 bench/bench_startup.py --repeats 3 --output bench/results_startup.json

Rows (fresh subprocesses, interleaved round by round so machine load hits all alike):

- ``clip_benchmark --help`` (the baseline of the start-up rows);
- ``clip_benchmark_robust --help``, ``plugins`` and ``eval --help``; targets 0.15x, 0.15x, 0.5x;
- ``clip_benchmark eval`` (crp-tiny, wds/spurious_shapes, 2000 test images; the baseline of the
  warm row) and ``clip_benchmark_robust eval --mitigation dfr`` with a warm feature cache (zero-shot
  + DFR from cached features and the cached text head; no model is built); target 0.35x.

Prints medians and ratios, writes everything to ``--output``.
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
import bench_eval as be  # noqa: E402 - the shared helpers: shards, console scripts, the clip_benchmark shim

TARGETS = {"robust --help": 0.15, "robust plugins": 0.15, "robust eval --help": 0.5, "robust warm eval (zeroshot+dfr)": 0.35}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--test_size", type=int, default=2000)
    parser.add_argument("--output", default=str(Path(__file__).with_name("results_startup.json")))
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    data = work / "data"
    be.ensure_data(data, train=2000, val=400, test=args.test_size, image_size=32, seed=0)
    (work / "clip_benchmark_shim.py").write_text(be.SHIM)
    shim = [sys.executable, str(work / "clip_benchmark_shim.py"), "--add_model_config", str(be.TINY_CONFIG)]
    if be.numpy_breaks_clip_benchmark():
        shim.append("--patch_accuracy")
    checkpoint = str(be.SHIPPED_CHECKPOINT)
    common = ["eval", "--dataset", "wds/spurious_shapes", "--dataset_root", str(data), "--task", "zeroshot_classification",
              "--model", "crp-tiny", "--pretrained", checkpoint, "--batch_size", "256", "--num_workers", "0", "--no_amp"]
    robust = be.console_script("clip_benchmark_robust")
    cache = work / "cache"
    rows = {
        "clip_benchmark --help": [be.console_script("clip_benchmark"), "--help"],
        "robust --help": [robust, "--help"],
        "robust plugins": [robust, "plugins"],
        "robust eval --help": [robust, "eval", "--help"],
        "clip_benchmark eval": [*shim, *common, "--output", str(work / "a.json")],
        "robust warm eval (zeroshot+dfr)": [robust, *common, "--mitigation", "dfr", "--feature_cache", str(cache),
                                            "--output", str(work / "c.json")],
    }
    # fill the cache once (untimed): the cold run
    be.run_timed(rows["robust warm eval (zeroshot+dfr)"], label="warm-up")
    walls: dict[str, list[float]] = {name: [] for name in rows}
    for round_ in range(args.repeats):
        for name, cmd in rows.items():
            wall, proc = be.run_timed(cmd, label=name)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
            walls[name].append(wall)
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)
    warm = json.loads((work / "c.json").read_text())["robust"]
    medians = {name: statistics.median(v) for name, v in walls.items()}
    base_help, base_eval = medians["clip_benchmark --help"], medians["clip_benchmark eval"]
    ratios = {name: medians[name] / (base_eval if "eval (" in name else base_help) for name in TARGETS}
    results = {
        "script": "bench/bench_startup.py", "machine": be.machine_info(), "repeats": args.repeats,
        "walls": walls, "medians": medians, "ratios": ratios, "targets": TARGETS,
        "warm_run": {"model_loaded": warm.get("model_loaded"), "features_extracted": warm.get("features_extracted")},
        "commands": {name: be.shell(cmd).replace(str(work), "$WORK") for name, cmd in rows.items()},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'command':36s} {'median s':>9s} {'ratio':>7s} {'target':>7s}")
    for name, median in medians.items():
        ratio = f"{ratios[name]:.3f}" if name in ratios else "1"
        target = f"<={TARGETS[name]}" if name in TARGETS else "base"
        print(f"{name:36s} {median:9.2f} {ratio:>7s} {target:>7s}")
    print(f"warm run built the model: {warm.get('model_loaded')}; passes: {warm.get('features_extracted')}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
