"""Measure RaVL's documented numbers (docs/methods/ravl.md): the mitigation in the paper's protocol,
the oracle diagnostic, and the loss-option ablation on val.

Reproduce (CPU, offline; data generated once into --work_dir)::

    python3 scripts/ravl_results.py ablation --seeds 0          # loss options, val split
    python3 scripts/ravl_results.py protocol --seeds 0 1 2      # test split

Every run is ``clip_benchmark_robust eval`` on ``robust/spurious_quadrants`` (default data
flags, data seed 0) with ``--model crp-tiny --pretrained spurious_quadrants`` (the biased,
evaluated model: zero-shot is the baseline and discovery runs on it) and
``--ravl_init spurious_shapes`` (both fine-tunings start from the model before it learned
the shortcut and see the 95%-correlated train split), plus ``--train_flags``.

- ``ablation``: ``ravl`` on the val split for each ``--ravl_positive_regions`` x
  ``--ravl_negatives`` (token regions), then ``--ravl_region_features masked|crops`` with the
  chosen options; the defaults are the best val worst-group accuracy.
- ``protocol``: per seed, on the test split: ``--mitigation clip_ft ravl`` with the loss options
  of before the ablation (positives all, negatives spurious, token regions), ``ravl`` with the
  chosen loss options and token regions, ``ravl`` with the defaults (masked regions), and
  ``ravl --ravl_spurious_regions oracle`` (labelled patch regions; a diagnostic; options of before).

Prints Markdown tables (mean ± std over seeds) and writes every per-seed number to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from clip_robust_plugins import cli

TRAIN_FLAGS = ["--ravl_epochs", "3", "--ravl_lr", "1e-4"]
#: the loss options before the val ablation chose the defaults (the first protocol runs used them)
PREVIOUS = ["--ravl_positive_regions", "all", "--ravl_negatives", "spurious", "--ravl_region_features", "tokens"]
#: the loss options chosen by the first ablation, with token regions (before masked regions were chosen)
CHOSEN_TOKENS = ["--ravl_region_features", "tokens"]
KEYS = ("acc", "worst_group_acc", "region_acc", "region_worst_group_acc")


def run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"failed (exit {rc}): clip_benchmark_robust {' '.join(argv)}")
    return time.perf_counter() - t0


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values) if len(values) > 1 else 0.0:.3f}"


def evaluate(work: Path, seed: int, split: str, extra: list[str], tag: str) -> dict:
    res = work / f"{tag}_{split}_seed{seed}.json"
    if res.is_file():  # an earlier, complete run of the same command (results are written atomically)
        seconds = None
    else:
        seconds = run(["eval", "--dataset", "robust/spurious_quadrants", "--dataset_root", str(work / "quadrants"),
                       "--model", "crp-tiny", "--pretrained", "spurious_quadrants", "--split", split,
                       "--seed", str(seed), "--num_workers", "0", "--no_amp", "--feature_cache", str(work / "features"),
                       "--quiet", "--ravl_init", "spurious_shapes", "--output", str(res), *extra])
    dump = json.loads(res.read_text())
    methods = dump["robust"]["methods"]
    return {"wall_seconds": round(seconds, 1) if seconds is not None else None,
            "metrics": {m: {k: dump["metrics"].get(f"{m}/{k}") for k in KEYS} for m in methods},
            "ravl": {k: methods["ravl"]["hyperparameters"].get(k) for k in ("discovery", "spurious_train_regions",
                                                                              "region_features_used")}
            if "ravl" in methods else None}


def table(rows: dict[str, list[dict]]) -> str:
    lines = ["| method | acc | worst-group acc | region acc | region worst-group acc |", "|---|---|---|---|---|"]
    for name, per_seed in rows.items():
        lines.append(f"| {name} | " + " | ".join(mean_std([r[k] for r in per_seed]) for k in KEYS) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("ablation", "protocol"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--work_dir", default="ravl_results_work")
    p.add_argument("--output", default=None, help="JSON of every per-seed number (default <work_dir>/<part>.json)")
    p.add_argument("--train_flags", nargs="*", default=TRAIN_FLAGS, help="--ravl_* flags for both fine-tunings")
    args = p.parse_args()
    work = Path(args.work_dir)
    out: dict = {"part": args.part, "seeds": args.seeds, "train_flags": args.train_flags, "runs": {}}
    if args.part == "ablation":
        rows: dict[str, list[dict]] = {}
        for positives in ("all", "relevant"):
            for negatives in ("spurious", "spurious+other_classes"):
                name = f"ravl positives={positives} negatives={negatives}"
                for seed in args.seeds:
                    r = evaluate(work, seed, "val", ["--mitigation", "ravl", "--ravl_positive_regions", positives,
                                                     "--ravl_negatives", negatives, *CHOSEN_TOKENS, *args.train_flags],
                                 f"ablation_{positives}_{negatives.replace('+', '_')}")
                    out["runs"].setdefault(name, {})[seed] = r
                    rows.setdefault(name, []).append(r["metrics"]["ravl"])
        for mode in ("masked", "crops"):  # then the region embeddings, with the chosen loss options
            name = f"ravl region_features={mode}"
            for seed in args.seeds:
                r = evaluate(work, seed, "val", ["--mitigation", "ravl", "--ravl_region_features", mode,
                                                 *args.train_flags], f"views_{mode}")
                out["runs"].setdefault(name, {})[seed] = r
                rows.setdefault(name, []).append(r["metrics"]["ravl"])
        print(f"robust/spurious_quadrants [val], ravl from spurious_shapes, seeds {args.seeds}\n")
        print(table(rows))
    else:
        rows = {}
        for seed in args.seeds:
            r = evaluate(work, seed, "test", ["--mitigation", "clip_ft", "ravl", *PREVIOUS, *args.train_flags],
                         "protocol")
            c = evaluate(work, seed, "test", ["--mitigation", "ravl", *CHOSEN_TOKENS, *args.train_flags], "chosen")
            d = evaluate(work, seed, "test", ["--mitigation", "ravl", "--ravl_region_features", "masked",
                                              *args.train_flags], "masked")
            o = evaluate(work, seed, "test", ["--mitigation", "ravl", "--ravl_spurious_regions", "oracle", *PREVIOUS,
                                              *args.train_flags], "oracle")
            out["runs"][seed] = {"main": r, "chosen": c, "masked": d, "oracle": o}
            for m in ("zeroshot", "clip_ft", "ravl"):
                name = {"zeroshot": "zero-shot (biased model)", "ravl": "ravl (positives all, negatives spurious)"}
                rows.setdefault(name.get(m, m), []).append(r["metrics"][m])
            rows.setdefault("ravl (positives relevant, negatives spurious+other_classes, tokens)", []).append(
                c["metrics"]["ravl"])
            rows.setdefault("ravl (defaults: relevant, spurious+other_classes, masked regions)", []).append(
                d["metrics"]["ravl"])
            rows.setdefault("ravl, oracle spurious regions (all, spurious; diagnostic)", []).append(o["metrics"]["ravl"])
        print(f"robust/spurious_quadrants [test], crp-tiny, fine-tuning from spurious_shapes, seeds {args.seeds}, "
              f"{' '.join(args.train_flags)}\n")
        print(table(rows))
    Path(args.output or work / f"{args.part}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
