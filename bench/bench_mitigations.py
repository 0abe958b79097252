"""Cost of mitigations in one eval: zero-shot + DFR + CFR against zero-shot alone.

Run by hand (never by the tests), from the repository root::

    python3 bench/bench_mitigations.py            # default spurious_shapes, shipped crp-tiny
    python3 bench/bench_mitigations.py --repeats 3

On the same generated shards and checkpoint, each repeat runs in fresh subprocesses with
fresh, empty feature caches:

a. ``clip_benchmark_robust eval`` (zero-shot only);
b. the same with ``--mitigation dfr cfr``.

It reports wall time, the ratio b/a, and from b's results JSON the feature passes the
engine made (each (split, kinds) must appear once: the mitigations share one extraction
per split and never re-extract) and each method's fit time, so the ratio can be split
into extraction and training (CFR's three stages are listed separately: its cost is
``--cfr_epochs`` recalibration epochs).  Numbers go to ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate


def timed_eval(work: Path, tag: str, extra: list[str], common: list[str]) -> tuple[float, dict]:
    cache = work / f"cache_{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    out = work / f"{tag}.json"
    cmd = [shutil.which("clip_benchmark_robust") or "clip_benchmark_robust", "eval", *common,
           "--feature_cache", str(cache), "--output", str(out), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mitigation", nargs="+", default=["dfr", "cfr"])
    p.add_argument("--output", default="bench/results_mitigations.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="crp_bench_mit_"))
    try:
        generate(work / "data", ShapesConfig(), progress=False)
        common = ["--dataset", "robust/spurious_shapes", "--dataset_root", str(work / "data"),
                  "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--num_workers", "0", "--no_amp"]
        zs, mit, last = [], [], None
        for i in range(args.repeats):
            zs.append(timed_eval(work, f"zs{i}", [], common)[0])
            seconds, last = timed_eval(work, f"mit{i}", ["--mitigation", *args.mitigation], common)
            mit.append(seconds)
        passes = last["robust"]["features_extracted"]
        keys = [(e["split"], tuple(e["kinds"])) for e in passes]
        fit = {m: info["fit_seconds"] for m, info in last["robust"]["methods"].items()}
        cfr_hp = last["robust"]["methods"].get("cfr", {}).get("hyperparameters", {})
        cfr_stages = cfr_hp.get("seconds")
        a, b = statistics.median(zs), statistics.median(mit)
        fit_total = sum(fit.values())
        print(f"a: zero-shot only                 {a:7.2f} s")
        print(f"b: zero-shot + {' + '.join(args.mitigation):17s} {b:7.2f} s   b/a = {b / a:.2f}")
        print(f"   of which mitigation fitting    {fit_total:7.2f} s   {fit}")
        print(f"   b without fitting / a          {(b - fit_total) / a:.2f}")
        if cfr_stages:
            per_epoch = cfr_stages["recalibration"] / max(1, cfr_hp["epochs"])
            print(f"   cfr stages {cfr_stages}  ({cfr_hp['epochs']} epochs, {per_epoch:.2f} s/epoch)")
        print(f"   feature passes in b: {keys}  (each split once: {len(set(s for s, _ in keys)) == len(keys)})")
        Path(args.output).write_text(json.dumps({
            "zeroshot_seconds": zs, "mitigation_seconds": mit, "ratio": b / a, "fit_seconds": fit,
            "ratio_without_fit": (b - fit_total) / a, "feature_passes": passes,
            "mitigations": args.mitigation, "cfr_stage_seconds": cfr_stages, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
        }, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
