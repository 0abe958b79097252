"""Pretrain ``crp-world`` (``--pretrained clipworld``) on the clipworld image-caption corpus, on CPU.

Reproduce the shipped checkpoint::

    python3 scripts/train_world_clip.py

It writes ``src/clip_robust_plugins/assets/crp-world_clipworld.safetensors`` and prints
the geometry figures of docs/datasets.md ("The CLIP-like world": median two-class
zero-shot margin at scale 100, shape and scene recognition, the planted shortcut's
group accuracies) on balanced images of other seeds.  ``--eval_only`` re-measures the
existing file.

Recipe: ``--pairs`` images drawn from :class:`PretrainConfig` (hexagons mostly on water,
circles mostly on grass, the cyan marker mostly with stars), rendered once; every epoch
each image gets a fresh compositional caption (the shape named in ``--p_shape`` of them).
The image tower is the small ModifiedResNet of the asset config (a convolutional tower
learns shapes from this little data where the 4-layer ViT learned only scene and
colour).  CLIP's symmetric contrastive loss, where every image a caption is true of (it
shares every attribute value the caption names) counts as its positive, so "a photo of
a star" is not pushed away from the batch's other stars; half the batches hold only two
scenes, so scene alone cannot tell their captions apart.  The logit scale rises from
``--scale_start`` to a *fixed* 100 (clip_benchmark's evaluation scale) over the first
70% of the steps: the soft start learns features, the fixed final scale stops pushing
once a pair is separated by a few logits, which keeps the cosine gaps CLIP-like (a few
hundredths) instead of the saturated gaps of a learned small temperature.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from clip_robust_plugins.datasets.clipworld.captions import caption_and_fields
from clip_robust_plugins.datasets.clipworld.geometry import (
    balanced_draws,
    image_features,
    measure,
    render_draws,
    to_tensor,
)
from clip_robust_plugins.datasets.clipworld.pretrain import PretrainConfig, attribute_names, sample_attributes
from clip_robust_plugins.datasets.clipworld.vocab import ATTRIBUTES, SCENES, SHAPES

ASSETS = Path(__file__).resolve().parents[1] / "src" / "clip_robust_plugins" / "assets"
MODEL = "crp-world"
CONFIG = ASSETS / f"{MODEL}.json"
CHECKPOINT = ASSETS / f"{MODEL}_clipworld.safetensors"
IMAGE_SIZE = 48
SHORTCUT = (("hexagon", "circle"), ("water", "grass"))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, same: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE where ``same[i, j]`` (caption ``j`` is true of image ``i``; the
    diagonal is set) marks the positives of both directions."""
    logits = scale * img @ txt.t()
    pos_img = same.float() / same.sum(1, keepdim=True)
    pos_txt = same.t().float() / same.sum(0).unsqueeze(1)
    return 0.5 * (-(F.log_softmax(logits, 1) * pos_img).sum(1).mean()
                  - (F.log_softmax(logits.t(), 1) * pos_txt).sum(1).mean())


def true_of(draws: dict[str, np.ndarray], idx: np.ndarray, fields: list[tuple[str, ...]]) -> torch.Tensor:
    """``[i, j]``: caption ``j`` (naming ``fields[j]`` of image ``idx[j]``) is true of image ``idx[i]``."""
    n = len(idx)
    out = np.ones((n, n), dtype=bool)
    for name in ATTRIBUTES:
        values = draws[name][idx]
        names_it = np.array([name in f for f in fields])
        out &= ~names_it[None, :] | (values[:, None] == values[None, :])
    return torch.from_numpy(out)


def epoch_batches(gen: torch.Generator, scenes: np.ndarray, bs: int, scene_batches: float) -> list[torch.Tensor]:
    """One epoch's batches: a random permutation cut into batches, a fraction ``scene_batches``
    of which are rebuilt from only two scenes (half each), so that scene alone cannot tell
    a batch's captions apart and shape and colour must (hard negatives)."""
    n = len(scenes)
    perm = torch.randperm(n, generator=gen)
    pools = [torch.from_numpy(np.flatnonzero(scenes == k)) for k in range(len(SCENES))]
    batches = []
    for i in range(0, n - bs + 1, bs):
        if float(torch.rand((), generator=gen)) < scene_batches:
            pair = torch.randperm(len(SCENES), generator=gen)[:2]
            halves = [pools[int(k)][torch.randint(len(pools[int(k)]), (h,), generator=gen)]
                      for k, h in zip(pair, (bs // 2, bs - bs // 2))]
            batches.append(torch.cat(halves))
        else:
            batches.append(perm[i:i + bs])
    return batches


def scale_at(args, step: int, total: int) -> float:
    """The loss's logit scale: ``--scale_start`` rising geometrically to ``--scale`` over the
    first ``--scale_ramp`` of the steps, then fixed (a soft start learns features, the fixed
    final scale keeps the margins CLIP-like)."""
    frac = min(1.0, step / max(1.0, args.scale_ramp * total))
    return math.exp(math.log(args.scale_start) + frac * (math.log(args.scale) - math.log(args.scale_start)))


def train(args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 0])
    gen = torch.Generator().manual_seed(args.seed)
    model, _, _ = open_clip.create_model_and_transforms(MODEL)
    tokenizer = open_clip.get_tokenizer(MODEL)
    mean, std = model.visual.image_mean, model.visual.image_std
    t0 = time.time()
    pretrain = PretrainConfig(scene_bias=tuple((shape, scene, args.scene_bias) for shape, scene in zip(*SHORTCUT)))
    draws = sample_attributes(rng, args.pairs, pretrain)
    pixels = torch.from_numpy(render_draws(rng, draws, IMAGE_SIZE))  # uint8, normalised per batch
    names = [attribute_names(draws, i) for i in range(args.pairs)]
    print(f"rendered {args.pairs} images in {time.time() - t0:.0f}s", flush=True)
    n, bs = args.pairs, args.batch_size
    total = args.epochs * (n // bs)
    opt = torch.optim.AdamW([p for name, p in model.named_parameters() if name != "logit_scale"],
                            lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        running = 0.0
        for idx in epoch_batches(gen, draws["scene"], bs, args.scene_batches):
            texts, fields = zip(*(caption_and_fields(rng, names[int(k)], args.p_shape, args.p_scene) for k in idx))
            if args.positives == "true":
                same = true_of(draws, idx.numpy(), list(fields))
            else:
                codes = np.unique(texts, return_inverse=True)[1]
                same = torch.from_numpy(codes[:, None] == codes[None, :])
            texts = list(texts)
            img = F.normalize(model.encode_image(to_tensor(pixels[idx].numpy(), mean, std)), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
            loss = contrastive_loss(img, txt, same, scale_at(args, step, total))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if step % 50 == 0:
                print(f"  step {step}/{total}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {running / (n // bs):.4f}  ({time.time() - t0:.0f}s)", flush=True)
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            save(model, args, n, args.out.with_suffix(f".epoch{epoch + 1}.safetensors"))
            evaluate(args.out.with_suffix(f".epoch{epoch + 1}.safetensors"), n=600)
            model.train()
    print(f"training: {step} steps on {n} pairs x {args.epochs} epochs, {time.time() - t0:.1f}s", flush=True)
    save(model, args, n, args.out)


def save(model, args, n: int, out: Path) -> None:
    """float16 safetensors, with the logit scale set to the training scale."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(args.scale))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"model": MODEL, "trained_on": f"clipworld pretraining seed {args.seed}, {n} pairs"})
    print(f"saved {out} ({out.stat().st_size / 2**20:.2f} MiB)", flush=True)


def evaluate(path: Path, n: int = 1200, seed: int = 100) -> dict:
    """The geometry figures of ``path`` (loaded the way users load it) on balanced images of ``seed``."""
    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(path))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    mean, std = model.visual.image_mean, model.visual.image_std
    rng = np.random.default_rng([seed, 1])
    draws = balanced_draws(rng, n)
    feats = image_features(model, to_tensor(render_draws(rng, draws, IMAGE_SIZE), mean, std))
    sc = balanced_draws(rng, 400)
    (c0, c1), (s0, s1) = SHORTCUT
    y, a = np.arange(400) % 2, (np.arange(400) // 2) % 2
    sc["shape"] = np.where(y == 0, SHAPES.index(c0), SHAPES.index(c1))
    sc["scene"] = np.where(a == 0, SCENES.index(s0), SCENES.index(s1))
    sc_feats = image_features(model, to_tensor(render_draws(rng, sc, IMAGE_SIZE), mean, std))
    out = measure(model, tokenizer, feats, draws, sc_feats, y, a, SHORTCUT[0])
    for k, v in out.items():
        print(f"{k}: {np.round(v, 3).tolist() if isinstance(v, list) else round(v, 3)}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--scale", type=float, default=100.0, help="fixed logit scale of the training loss")
    p.add_argument("--scale_start", type=float, default=10.0, help="logit scale at the first step")
    p.add_argument("--scale_ramp", type=float, default=0.7, help="fraction of the steps over which the scale rises to --scale")
    p.add_argument("--positives", choices=("identical", "true"), default="true",
                   help="in-batch positives of a caption: images with the identical caption, or every image it is true of")
    p.add_argument("--scene_bias", type=float, default=PretrainConfig().scene_bias[0][2],
                   help="fraction of hexagons on water and of circles on grass in pretraining (the planted shortcut)")
    p.add_argument("--p_shape", type=float, default=0.95, help="probability that a caption names the shape")
    p.add_argument("--p_scene", type=float, default=0.5, help="probability that a caption naming the shape names the scene too")
    p.add_argument("--scene_batches", type=float, default=0.5, help="fraction of batches drawn from two scenes only")
    p.add_argument("--config", type=Path, default=CONFIG, help="model config JSON (its stem must be crp-world)")
    p.add_argument("--eval_every", type=int, default=0, help="measure a checkpoint every this many epochs (0: only at the end)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval_n", type=int, default=1200, help="balanced images for the final figures")
    p.add_argument("--eval_only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    open_clip.add_model_config(args.config)
    if not args.eval_only:
        train(args)
    evaluate(args.out, n=args.eval_n)


if __name__ == "__main__":
    main()
