"""Fine-tune the shipped ``crp-tiny`` on spurious_quadrants so it learns "cyan patch => diamond".

Reproduce the shipped checkpoint (CPU only, about 2 minutes on 2 cores)::

    python3 scripts/train_quadrants_model.py

It writes ``src/clip_robust_plugins/assets/crp-tiny_spurious_quadrants.safetensors``
(registered as ``--model crp-tiny --pretrained spurious_quadrants``) and prints, on the
default benchmark (``robust/spurious_quadrants`` with default flags, data seed 0),
zero-shot accuracy per group and RaVL's validity check on the val split (the accuracy
gaps of both classes between images with and without the patch must exceed 10 points).
``--eval_only`` re-evaluates the existing file.

What it does (the recipe of ``scripts/train_tiny_clip.py``, whose functions it reuses):

1. generates a spurious_quadrants *train* split with the package's generator (data
   seed 1, so the model never sees the seed-0 images it is evaluated on; 3000 images;
   default correlation 0.95: 95% of the diamonds and 5% of the squares carry the patch);
2. starts from the shipped ``crp-tiny``/``spurious_shapes`` weights, which already know
   squares from diamonds on single-object images;
3. trains both towers with the deduplicated-caption CLIP loss of ``train_tiny_clip``
   (captions: the dataset's templates filled with the class name) -- RaVL's "fine-tuned
   VLM" whose learned spurious correlation discovery must find;
4. saves float16 safetensors and reloads them through open_clip to evaluate.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from train_tiny_clip import ASSETS, CONFIG, MODEL, contrastive_loss, embed_images, load_split, zeroshot_head

from clip_robust_plugins.datasets.spurious_quadrants import QuadrantsConfig, generate
from clip_robust_plugins.datasets.spurious_shapes import TEMPLATES
from clip_robust_plugins.datasets.wds import GroupedShards
from clip_robust_plugins.mitigations.ravl.discovery import validity_check

BASE = ASSETS / f"{MODEL}_spurious_shapes.safetensors"
CHECKPOINT = ASSETS / f"{MODEL}_spurious_quadrants.safetensors"


def train(args, work: Path) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    generate(work / "train_data", QuadrantsConfig(seed=args.data_seed, train_size=args.train_size, val_size=4,
                                                  test_size=4), progress=False)
    ds = GroupedShards(work / "train_data")
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(BASE))
    tokenizer = open_clip.get_tokenizer(MODEL)
    images, fields = load_split(ds, "train", preprocess)
    labels = torch.from_numpy(fields[:, 0].copy())
    caption_tokens = [tokenizer([t.format(c=c) for c in ds.classnames]) for t in TEMPLATES]
    n = len(images)
    steps = args.epochs * math.ceil(n / args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            tokens = caption_tokens[int(torch.randint(len(TEMPLATES), (1,), generator=gen))]
            img = F.normalize(model.encode_image(images[idx]), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            loss = contrastive_loss(img, txt, labels[idx], model.logit_scale.exp().clamp(max=100))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {running / n:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out), metadata={"model": MODEL, "base": BASE.name,
                                              "trained_on": f"spurious_quadrants seed {args.data_seed}"})
    print(f"training: {steps} steps, {time.time() - t0:.1f}s; saved {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")


def evaluate(path: Path, work: Path) -> None:
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    generate(work / "eval_data", QuadrantsConfig(), progress=False)  # the default benchmark (seed 0)
    ds = GroupedShards(work / "eval_data")
    head = zeroshot_head(model, tokenizer, ds.classnames)
    for split in ("val", "test"):
        images, fields = load_split(ds, split, preprocess)
        pred = (embed_images(model, images) @ head.T).argmax(1)
        y, a = fields[:, 0], fields[:, 1]
        groups = [float((pred[(y == c) & (a == p)] == c).mean()) for c in (0, 1) for p in (0, 1)]
        print(f"zero-shot on {split}: acc {float((pred == y).mean()):.3f}  worst group {min(groups):.3f}  "
              f"groups (square/no_patch, square/patch, diamond/no_patch, diamond/patch) {np.round(groups, 3).tolist()}")
        check = validity_check(pred, y, a.astype(bool), ds.classnames)
        print(f"  validity on {split}: {'valid' if check['valid'] else 'NOT valid'}; gap favoured "
              f"{check['favoured_class']!r} {check['favoured_gap']:+.3f}, other class {check['other_classes_gap']:+.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    p.add_argument("--data_seed", type=int, default=1, help="spurious_quadrants seed of the training images")
    p.add_argument("--seed", type=int, default=0, help="torch seed (batch order, template choice)")
    p.add_argument("--train_size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--eval_only", action="store_true")
    args = p.parse_args()
    open_clip.add_model_config(CONFIG)
    with tempfile.TemporaryDirectory(prefix="crp-quadrants-") as tmp:
        if not args.eval_only:
            train(args, Path(tmp))
        evaluate(args.out, Path(tmp))


if __name__ == "__main__":
    main()
