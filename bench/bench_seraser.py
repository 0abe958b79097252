"""SEraser's cost per test image: batched tuning against the one-image-at-a-time loop, same run.

Run by hand (never by the tests), from the repository root::

    python3 bench/bench_seraser.py                      # paper defaults: 20 steps, test split of 400
    python3 bench/bench_seraser.py --threads 1 --steps 100 --lr 1e-2

It generates the default ``robust/spurious_shapes`` (2000/400/400) into a temporary
directory, extracts the test split's image features and the ``masks`` views once (the
image tower is frozen, so this is a one-off cost per image, reported separately), and
then times :meth:`SEraser.tune` on the same features twice, in one process:

a. batched: ``--batch_size`` images per forward (default 256), each with its own context;
b. the per-image loop: batch size 1, i.e. 400 separate tunings.

It reports wall seconds, seconds per test image and the speed-up a/b (goal: at least 5x),
checks that both give the same predictions, and writes everything to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate
from clip_robust_plugins.datasets.wds import GroupedShards
from clip_robust_plugins.features import FeatureCache, FeatureExtractor
from clip_robust_plugins.mitigations.seraser import (
    MaskViews,
    PromptEncoder,
    SEraser,
    SEraserConfig,
    ViewOptions,
    black_image_features,
    view_kind,
)
from clip_robust_plugins.models import load_open_clip


def timed_tune(config: SEraserConfig, encoder, raw, fg, bg, black) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = SEraser(config).tune(encoder, raw, fg, bg, black, scale=config.logit_scale)
    return time.perf_counter() - t0, torch.cat([r.logits for r in out])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=SEraserConfig.steps)
    p.add_argument("--lr", type=float, default=SEraserConfig.lr)
    p.add_argument("--batch_size", type=int, default=SEraserConfig.batch_size)
    p.add_argument("--test_size", type=int, default=400)
    p.add_argument("--threads", type=int, nargs="*", default=[],
                   help="torch thread counts to time, one after the other (default: torch's own choice)")
    p.add_argument("--output", default="bench/results_seraser.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="crp_bench_seraser_"))
    try:
        shapes = ShapesConfig(test_size=args.test_size)
        generate(work / "data", shapes, progress=False)
        dataset = GroupedShards(work / "data")
        model, transform, tokenizer = load_open_clip("crp-tiny", "spurious_shapes")
        model.eval()
        extractor = FeatureExtractor(
            model, transform, model_type="open_clip", model_name="crp-tiny", pretrained="spurious_shapes",
            device="cpu", amp=False, batch_size=256, num_workers=0, cache=FeatureCache(None), progress=False,
        )
        t0 = time.perf_counter()
        raw = extractor.extract(dataset, "robust/spurious_shapes", "test", ["image"])["image"].features
        t1 = time.perf_counter()
        kind = view_kind(MaskViews(ViewOptions()), "masks")
        views = extractor.extract(dataset, "robust/spurious_shapes", "test", [kind])[kind.name].features
        black = black_image_features(model, transform, "cpu", False)
        t2 = time.perf_counter()
        n_fg = kind.derive.n_foreground
        fg, bg = views[:, :n_fg], views[:, n_fg:]
        encoder = PromptEncoder(model, tokenizer, dataset.classnames)

        batched_cfg = SEraserConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
        loop_cfg = SEraserConfig(steps=args.steps, lr=args.lr, batch_size=1)
        n = len(raw)
        runs = []
        for threads in args.threads or [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            timed_tune(SEraserConfig(steps=1, batch_size=8), encoder, raw[:8], fg[:8], bg[:8], black)  # warm-up
            t_batched, logits_batched = timed_tune(batched_cfg, encoder, raw, fg, bg, black)
            t_loop, logits_loop = timed_tune(loop_cfg, encoder, raw, fg, bg, black)
            same = bool(torch.equal(logits_batched.argmax(1), logits_loop.argmax(1)))
            runs.append({
                "torch_threads": threads,
                "seconds_tuning_batched": round(t_batched, 3),
                "seconds_tuning_per_image_loop": round(t_loop, 3),
                "seconds_per_image_batched": t_batched / n,
                "seconds_per_image_loop": t_loop / n,
                "speedup_batched_over_loop": t_loop / t_batched,
                "same_predictions": same,
                "max_abs_logit_difference": float((logits_batched - logits_loop).abs().max()),
                "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            })
            print(json.dumps(runs[-1]), flush=True)
        result = {
            "n_test_images": n,
            "steps": args.steps,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "views": {"provider": "masks", "n_foreground": n_fg, "n_background_with_black": int(bg.shape[1]) + 1},
            "seconds_extraction": {
                "image_features": round(t1 - t0, 3),
                "views_and_black_image_features": round(t2 - t1, 3),
                "views_per_image": (t2 - t1) / n,
            },
            "runs": runs,
            "machine": {
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    if not all(r["same_predictions"] for r in result["runs"]):
        raise SystemExit("batched and per-image predictions differ")


if __name__ == "__main__":
    main()
