"""Measure CFR on spurious_shapes: the README table, the per-epoch curves behind it, and the
experiments that chose its defaults (docs/methods/cfr.md).

Reproduce (CPU, offline; the dataset is generated once into --work_dir)::

    python3 scripts/cfr_results.py table  --seeds 0 1 2       # README table: defaults and the authors' variants
    python3 scripts/cfr_results.py tune   --seeds 0 1 2       # defaults: val score of each candidate setting
    python3 scripts/cfr_results.py diagnose --seeds 0 1 2     # where the late collapse comes from
    python3 scripts/cfr_results.py select --seeds 0 1 2       # label-free selection criteria vs worst-group

Every run is ``clip_benchmark_robust eval --mitigation cfr`` (in this process) on
``robust/spurious_shapes`` (2000/400/400 images, data seed 0) with ``crp-tiny``/``spurious_shapes``
and ``--seed SEED``; features are cached once in --work_dir and shared.  ``diagnose`` and
``select`` also score the test split after every epoch (through ``CFR.epoch_callback``; the fit
itself never sees test), so what each selection criterion would have kept can be read off one
trajectory.  Everything goes to ``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path

#: name -> extra eval flags; the README table
TABLE = {
    "cfr (defaults)": "",
    "cfr, authors' optimizer (sgd)": "--cfr_optimizer sgd",
    "cfr, learnable logit scale": "--cfr_logit_scale learnable",
    "cfr, model's logit scale": "--cfr_logit_scale model",
    "cfr, authors' negatives": "--cfr_negatives authors",
    "cfr, feature dropout 0.1": "--cfr_feature_dropout 0.1",
    "cfr, last-epoch ERM": "--cfr_erm_selection last",
    "cfr, 100 epochs": "--cfr_epochs 100",
    "cfr, all authors' settings": "--cfr_optimizer sgd --cfr_logit_scale learnable --cfr_negatives authors "
                                  "--cfr_feature_dropout 0.1 --cfr_erm_selection best --cfr_epochs 100",
    "cfr, class_balanced selection": "--cfr_selection class_balanced",
    "cfr, val_ce selection": "--cfr_selection val_ce",
}
#: candidates for the defaults, scored on val only (30 and 100 epochs of the baseline settings: ``select``)
TUNE = {  # measured with --cfr_erm_selection last (the default before this tuning)
    "e10": "--cfr_epochs 10 --cfr_erm_selection last",
    "e30 sgd lr1e-4": "--cfr_epochs 30 --cfr_erm_selection last --cfr_optimizer sgd",
    "e30 sgd lr1e-3": "--cfr_epochs 30 --cfr_erm_selection last --cfr_optimizer sgd --cfr_lr 1e-3",
    "e30 scale=model": "--cfr_epochs 30 --cfr_erm_selection last --cfr_logit_scale model",
    "e30 scale=learnable": "--cfr_epochs 30 --cfr_erm_selection last --cfr_logit_scale learnable",
    "e30 negatives=authors": "--cfr_epochs 30 --cfr_erm_selection last --cfr_negatives authors",
    "e30 dropout0.1": "--cfr_epochs 30 --cfr_erm_selection last --cfr_feature_dropout 0.1",
    "e30 erm=best": "--cfr_epochs 30 --cfr_erm_selection best",
    "e30 sgd + learnable scale": "--cfr_epochs 30 --cfr_erm_selection last --cfr_optimizer sgd --cfr_logit_scale learnable",
}
#: diagnostics of the collapse (config fields without flags are set through --cfr_diag)
DIAGNOSE = {
    "as is": "--cfr_epochs 50",
    "no CE term": "--cfr_epochs 50 --cfr_diag ce_weight=0",
    "no InfoNCE term": "--cfr_epochs 50 --cfr_diag nce_weight=0",
    "no SupCon term": "--cfr_epochs 50 --cfr_diag supcon_weight=0",
    "CE only": "--cfr_epochs 50 --cfr_diag nce_weight=0 supcon_weight=0",
    "8 anchors per step": "--cfr_epochs 50 --cfr_diag anchors_per_step=8",
    "logit scale 14.3": "--cfr_epochs 50 --cfr_logit_scale 14.2857",
    "lr 1e-5": "--cfr_epochs 50 --cfr_lr 1e-5",
    "authors' negatives": "--cfr_epochs 50 --cfr_negatives authors",
}
SELECT = {"30 epochs": "--cfr_epochs 30 --cfr_erm_selection last", "100 epochs": "--cfr_epochs 100 --cfr_erm_selection last",
          "defaults": ""}
MODES = {"table": TABLE, "tune": TUNE, "diagnose": DIAGNOSE, "select": SELECT}


def run(seed: int, flags: str, args: argparse.Namespace, tag: str, per_epoch: bool) -> dict:
    import torch

    from clip_robust_plugins import cli
    from clip_robust_plugins.metrics import group_metrics, worst_group_accuracy
    from clip_robust_plugins.mitigations import cfr as cfr_package
    from clip_robust_plugins.mitigations.cfr import training

    words = shlex.split(flags)
    diag = {}
    if "--cfr_diag" in words:
        i = words.index("--cfr_diag")
        rest = words[i + 1:]
        words = words[:i]
        diag = {k: (float(v) if "." in v or "e" in v else int(v)) for k, v in (w.split("=") for w in rest)}
    out = Path(args.work_dir) / f"{tag}_seed{seed}.json"
    argv = [
        "eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(Path(args.work_dir) / "data"),
        "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--seed", str(seed),
        "--feature_cache", str(Path(args.work_dir) / "features"), "--output", str(out),
        "--num_workers", "0", "--no_amp", "--quiet", "--mitigation", "cfr", *words,
    ]
    epochs: list[dict] = []
    real_fit, real_config = training.CFR.fit, cfr_package.config_from_options

    def config_from_options(cls, prefix, options, **explicit):
        return real_config(cls, prefix, options, **{**diag, **explicit})

    def fit(self, ctx):
        if per_epoch:
            test = ctx.features("test", cfr_package.FEATURE_KIND)
            val = ctx.features("val", cfr_package.FEATURE_KIND)
            names = ctx.schema.group_names()

            def record(epoch, head):
                row = {"epoch": epoch}
                for split, fs in (("val", val), ("test", test)):
                    pred = (training.embed_all(head, fs.features.float().to(ctx.device)) @ ctx.zeroshot_head()).argmax(1)
                    pred = pred.cpu().numpy()
                    g = fs.group_ids().numpy()
                    row[f"{split}_worst_group_acc"] = worst_group_accuracy(pred, fs.y.numpy(), g)
                    if split == "test":
                        m = group_metrics(pred, fs.y.numpy(), g, names)
                        row["test_acc"], row["test_worst_group"] = m["acc"], m["worst_group_name"]
                epochs.append(row)

            self.epoch_callback = record
        real_fit(self, ctx)

    training.CFR.fit, cfr_package.config_from_options = fit, config_from_options
    torch.set_num_threads(args.threads)
    try:
        rc = cli.main(argv)
    finally:
        training.CFR.fit, cfr_package.config_from_options = real_fit, real_config
    if rc != 0:
        raise SystemExit(f"eval failed: {' '.join(argv)} (exit {rc})")
    dump = json.loads(out.read_text())
    hp = dump["robust"]["methods"]["cfr"]["hyperparameters"]
    return {
        "seed": seed, "flags": flags, "test_worst_group_acc": dump["metrics"]["cfr/worst_group_acc"],
        "test_acc": dump["metrics"]["cfr/acc"], "selection": hp["selection"], "curve": hp["curve"],
        "erm_selected_epoch": hp["erm_selected_epoch"], "calibration_set_size": hp["calibration_set_size"],
        "fit_seconds": dump["robust"]["methods"]["cfr"]["fit_seconds"], "per_epoch": epochs,
        "zeroshot_test_worst_group_acc": dump["metrics"]["zeroshot/worst_group_acc"],
        "zeroshot_test_acc": dump["metrics"]["zeroshot/acc"],
    }


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def selections(r: dict) -> dict[str, int]:
    """The epoch each criterion keeps on this trajectory (earliest on ties)."""
    curve = r["curve"]
    out = {}
    for name, key, higher in (("worst_group", "val_worst_group_acc", True),
                              ("class_balanced", "val_class_balanced_acc", True), ("val_ce", "val_ce", False)):
        values = [row[key] if key in row else r["per_epoch"][row["epoch"]][key] for row in curve]
        best = max(values) if higher else min(values)
        out[name] = values.index(best)
    out["last"] = len(curve) - 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny matmuls)")
    p.add_argument("--work_dir", default="cfr_results_work")
    p.add_argument("--output", default=None, help="JSON (default cfr_results_<mode>.json)")
    args = p.parse_args()
    work = Path(args.work_dir)
    if not (work / "data").is_dir():
        from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate

        generate(work / "data", ShapesConfig(), progress=False)
    variants = {k: v for k, v in MODES[args.mode].items() if args.only is None or k in args.only}
    per_epoch = args.mode in ("diagnose", "select")
    t0 = time.perf_counter()
    results = {name: [run(s, flags, args, f"{args.mode}{i}", per_epoch) for s in args.seeds]
               for i, (name, flags) in enumerate(variants.items())}
    seconds = time.perf_counter() - t0

    print(f"robust/spurious_shapes, crp-tiny/spurious_shapes, seeds {args.seeds} (mean ± std)\n")
    if args.mode == "table":
        zs = next(iter(results.values()))
        print("| method | flags | worst-group acc (test) | acc (test) |\n|---|---|---|---|")
        print(f"| zero-shot | | {mean_std([r['zeroshot_test_worst_group_acc'] for r in zs])} | "
              f"{mean_std([r['zeroshot_test_acc'] for r in zs])} |")
        for name, rs in results.items():
            print(f"| {name} | `{variants[name]}` | {mean_std([r['test_worst_group_acc'] for r in rs])} | "
                  f"{mean_std([r['test_acc'] for r in rs])} |")
    elif args.mode == "tune":
        print("| setting | val score at the selected epoch | selected epoch |\n|---|---|---|")
        for name, rs in results.items():
            print(f"| {name} | {mean_std([r['selection']['value'] for r in rs])} | "
                  f"{[r['selection']['epoch'] for r in rs]} |")
    else:
        print("| variant | criterion | kept epochs | val WGA | test WGA | test acc | test WGA at last epoch |")
        print("|---|---|---|---|---|---|---|")
        for name, rs in results.items():
            for crit in ("worst_group", "class_balanced", "val_ce", "last"):
                picks = [selections(r)[crit] for r in rs]
                rows = [r["per_epoch"][e] for r, e in zip(rs, picks)]
                last = [r["per_epoch"][-1]["test_worst_group_acc"] for r in rs]
                print(f"| {name} | {crit} | {picks} | {mean_std([x['val_worst_group_acc'] for x in rows])} | "
                      f"{mean_std([x['test_worst_group_acc'] for x in rows])} | {mean_std([x['test_acc'] for x in rows])} "
                      f"| {mean_std(last)} |")
    print(f"\n{sum(len(v) for v in results.values())} fits in {seconds:.0f} s")
    Path(args.output or f"cfr_results_{args.mode}.json").write_text(
        json.dumps({"mode": args.mode, "seeds": args.seeds, "seconds": seconds, "variants": variants,
                    "results": results}, indent=1))


if __name__ == "__main__":
    main()
