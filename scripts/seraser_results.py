"""Measure SEraser's results table: every view provider x schedule, mean ± std over run seeds.

Reproduce (CPU, offline; the dataset is generated once into --work_dir)::

    python3 scripts/seraser_results.py --seeds 0 1 2

Each cell runs ``clip_benchmark_robust eval --mitigation seraser`` on
``robust/spurious_shapes`` (default flags: 2000/400/400 images, data seed 0) with the shipped
``crp-tiny``/``spurious_shapes`` and ``--seed SEED``, for ``--seraser_views`` auto, masks,
augment and authors under the paper's schedule (20 steps, lr 5e-4) and the tuned one
(100 steps, lr 1e-2).  Image and view features are cached in --work_dir and shared.  Prints
a Markdown table of worst-group and mean accuracy (with zero-shot's), then one of what the
tuning did (how far the context moved, the text features' cosine to the untuned ones, the
class margins), and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from clip_robust_plugins import cli

VIEWS = ("auto", "masks", "augment", "authors")
SCHEDULES = {"paper (20 steps, lr 5e-4)": ("20", "5e-4"), "tuned (100 steps, lr 1e-2)": ("100", "1e-2")}


def run(args: argparse.Namespace, spec: str, steps: str, lr: str, seed: int) -> dict:
    """One eval; ``spec`` is a provider name, optionally followed by its flags ("augment --seraser_n_aug 15")."""
    views, *flags = spec.split()
    work = Path(args.work_dir)
    tag = "".join(c if c.isalnum() else "_" for c in spec)
    out = work / f"{tag}_s{steps}_lr{lr}_seed{seed}.json"
    argv = [
        "eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(work / "data"), "--split", args.split,
        "--model", args.model, "--pretrained", args.pretrained, "--seed", str(seed),
        "--feature_cache", str(work / "features"), "--output", str(out), "--num_workers", "0", "--no_amp", "--quiet",
        "--mitigation", "seraser", "--seraser_views", views, "--seraser_steps", steps, "--seraser_lr", lr, *flags,
    ]
    rc = cli.main(argv)
    if rc != 0:
        raise SystemExit(f"eval failed: {' '.join(argv)} (exit {rc})")
    return json.loads(out.read_text())


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--views", nargs="+", default=list(VIEWS),
                   help="providers, each optionally with its flags in one quoted word: 'augment --seraser_n_aug 15'")
    p.add_argument("--split", default="test")
    p.add_argument("--model", default="crp-tiny")
    p.add_argument("--pretrained", default="spurious_shapes")
    p.add_argument("--work_dir", default="seraser_results_work")
    p.add_argument("--output", default="seraser_results.json")
    args = p.parse_args()

    t0 = time.perf_counter()
    cells: dict[str, list[dict]] = {}
    for label, (steps, lr) in SCHEDULES.items():
        for views in args.views:
            cells[f"{views} | {label}"] = [run(args, views, steps, lr, seed) for seed in args.seeds]
    seconds = time.perf_counter() - t0

    first = next(iter(cells.values()))[0]["metrics"]
    print(f"robust/spurious_shapes {args.split} split, {args.model}/{args.pretrained}, seeds {args.seeds} (mean ± std)\n")
    print("| views (resolved) | schedule | worst-group acc | mean acc |")
    print("|---|---|---|---|")
    print(f"| zero-shot | - | {first['zeroshot/worst_group_acc']:.3f} | {first['zeroshot/acc']:.3f} |")
    rows, diag_rows = {}, {}
    for name, dumps in cells.items():
        views, label = name.split(" | ")
        hps = [d["robust"]["methods"]["seraser"]["hyperparameters"] for d in dumps]
        resolved = sorted({h["view_provider"] for h in hps})
        wga = [d["metrics"]["seraser/worst_group_acc"] for d in dumps]
        acc = [d["metrics"]["seraser/acc"] for d in dumps]
        shown = views if resolved == [views.split()[0]] else f"{views} ({', '.join(resolved)})"
        rows[name] = {"resolved": resolved, "worst_group_acc": wga, "acc": acc}
        print(f"| {shown} | {label} | {mean_std(wga)} | {mean_std(acc)} |")
        diag = [h["diagnostics"] for h in hps]
        diag_rows[name] = {
            "ctx_relative_change_median": statistics.mean(g["ctx_relative_change"]["median"] for g in diag),
            "text_cosine_min": min(g["text_cosine_tuned_vs_untuned_min_over_classes"]["min"] for g in diag),
            "untuned_margin_median": statistics.mean(g["untuned_margin"]["median"] for g in diag),
            "untuned_margin_min": min(g["untuned_margin"]["min"] for g in diag),
            "tuned_margin_median": statistics.mean(g["tuned_margin"]["median"] for g in diag),
            "predictions_changed": statistics.mean(1.0 - h["untuned_agreement"] for h in hps),
        }
    print("\n| views | schedule | context moved (median ‖Δctx‖/‖ctx₀‖) | min cos(tuned, untuned text) | "
          "untuned margin at scale 100 (median / min) | tuned margin (median) | predictions changed |")
    print("|---|---|---|---|---|---|---|")
    for name, d in diag_rows.items():
        views, label = name.split(" | ")
        print(f"| {views} | {label} | {d['ctx_relative_change_median']:.2f} | {d['text_cosine_min']:.3f} | "
              f"{d['untuned_margin_median']:.1f} / {d['untuned_margin_min']:.2f} | {d['tuned_margin_median']:.1f} | "
              f"{d['predictions_changed']:.3f} |")
    print(f"\n{sum(len(v) for v in cells.values())} evals in {seconds:.1f} s")
    Path(args.output).write_text(json.dumps(
        {"seeds": args.seeds, "split": args.split, "seconds": seconds, "rows": rows, "diagnostics": diag_rows}, indent=1
    ))


if __name__ == "__main__":
    main()
