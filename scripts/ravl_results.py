"""Measure the README's RaVL numbers: discovery Precision@10 and time, and worst-group accuracy before/after.

Reproduce (CPU, offline; data generated once into --work_dir)::

    python3 scripts/ravl_results.py --seeds 0 1 2

1. **Discovery** on ``robust/spurious_quadrants`` (default flags: val split of 400
   images, data seed 0) with the shipped ``crp-tiny``/``spurious_quadrants`` model, one
   ``clip_benchmark_robust discover`` per run seed (``--seed`` seeds k-medoids).  The
   first seed extracts and caches the features (cold), the others read them (warm); both
   wall times are reported, with the report's own phase timings.
2. **Mitigation**: one ``eval --mitigation clip_ft ravl`` per run seed on the test split of
   ``robust/spurious_quadrants`` (model ``spurious_quadrants``) and of
   ``robust/spurious_shapes`` (model ``spurious_shapes``), both with default data flags,
   the same ``--ravl_*`` training flags for both methods (``--train_flags``); worst-group
   accuracy and sample-mean accuracy, mean ± std over seeds.

Prints Markdown tables and writes every per-seed number to ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from clip_robust_plugins import cli

TRAIN_FLAGS = ["--ravl_epochs", "3", "--ravl_lr", "1e-4"]
SETTINGS = (
    ("robust/spurious_quadrants", "spurious_quadrants"),
    ("robust/spurious_shapes", "spurious_shapes"),
)


def run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"failed (exit {rc}): clip_benchmark_robust {' '.join(argv)}")
    return time.perf_counter() - t0


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--work_dir", default="ravl_results_work")
    p.add_argument("--output", default="ravl_results.json")
    p.add_argument("--train_flags", nargs="*", default=TRAIN_FLAGS, help="--ravl_* flags for both fine-tunings")
    p.add_argument("--skip_mitigation", action="store_true")
    args = p.parse_args()
    work = Path(args.work_dir)
    common = ["--model", "crp-tiny", "--num_workers", "0", "--no_amp", "--feature_cache", str(work / "features")]
    out: dict = {"seeds": args.seeds, "train_flags": args.train_flags, "discovery": {}, "mitigation": {}}

    # 1. discovery
    for seed in args.seeds:
        report_path = work / f"discover_seed{seed}.json"
        seconds = run(["discover", "--dataset", "robust/spurious_quadrants", "--dataset_root", str(work / "quadrants"),
                       "--pretrained", "spurious_quadrants", "--seed", str(seed), "--output", str(report_path),
                       "--quiet", *common])
        report = json.loads(report_path.read_text())
        out["discovery"][seed] = {"wall_seconds": round(seconds, 2), "precision@10": report["precision@10"],
                                  "k": report["clustering"]["k"], "validity": report["validity"],
                                  "top_cluster": report["top_cluster"] and {
                                      k: report["top_cluster"][k] for k in ("affected_class", "performance_gap", "influence")},
                                  "seconds": report["seconds"]}
    print("Discovery on robust/spurious_quadrants [val], crp-tiny/spurious_quadrants\n")
    print("| seed | precision@10 | K | top cluster: affected class, G, H | wall s | discovery s (features, boxes, clustering) |")
    print("|---|---|---|---|---|---|")
    for seed, d in out["discovery"].items():
        t, s = d["top_cluster"] or {}, d["seconds"]
        print(f"| {seed} | {d['precision@10']:.2f} | {d['k']} | {t.get('affected_class')}, {t.get('performance_gap')}, "
              f"{t.get('influence')} | {d['wall_seconds']:.1f} | {s['discovery_total']:.1f} ({s['features']:.1f}, "
              f"{s['boxes']:.1f}, {s['clustering_and_scores']:.1f}) |")
    v = next(iter(out["discovery"].values()))["validity"]
    print(f"\nvalidity: {v['valid']}, favoured {v['favoured_class']} gap {v['favoured_gap']:+.3f}, "
          f"other classes {v['other_classes_gap']:+.3f}")

    # 2. mitigation
    if not args.skip_mitigation:
        for dataset, pretrained in SETTINGS:
            name = dataset.split("/", 1)[1]
            rows = {}
            for seed in args.seeds:
                res = work / f"{name}_seed{seed}.json"
                seconds = run(["eval", "--dataset", dataset, "--dataset_root", str(work / name), "--pretrained", pretrained,
                               "--seed", str(seed), "--mitigation", "clip_ft", "ravl", "--output", str(res), "--quiet",
                               *common, *args.train_flags])
                dump = json.loads(res.read_text())
                rows[seed] = {"wall_seconds": round(seconds, 1), "metrics": {
                    m: {k: dump["metrics"][f"{m}/{k}"] for k in ("worst_group_acc", "acc")}
                    for m in ("zeroshot", "clip_ft", "ravl")},
                    "fit_seconds": {m: dump["robust"]["methods"][m]["fit_seconds"] for m in ("clip_ft", "ravl")},
                    "ravl_discovery": dump["robust"]["methods"]["ravl"]["hyperparameters"]["discovery"]}
            out["mitigation"][dataset] = rows
            print(f"\n{dataset} [test], crp-tiny/{pretrained}, seeds {args.seeds}, {' '.join(args.train_flags)}\n")
            print("| method | worst-group acc | acc (sample mean) |")
            print("|---|---|---|")
            for m in ("zeroshot", "clip_ft", "ravl"):
                wga = [r["metrics"][m]["worst_group_acc"] for r in rows.values()]
                acc = [r["metrics"][m]["acc"] for r in rows.values()]
                print(f"| {m} | {mean_std(wga)} | {mean_std(acc)} |")
            fits = {m: statistics.mean(r["fit_seconds"][m] for r in rows.values()) for m in ("clip_ft", "ravl")}
            print(f"\nmean fit seconds: {fits}")
    Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
