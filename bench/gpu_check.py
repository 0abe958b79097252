"""A prepared GPU check: one table of what the CUDA path does, in under five minutes on one GPU.

    python3 bench/gpu_check.py                       # CUDA: ViT-B-32 (random init), AMP, 4/8/16 workers
    python3 bench/gpu_check.py --out gpu_check.json  # also save the table
    python3 bench/gpu_check.py --reduced             # the CPU mode (crp-tiny random init, workers 0/1, gloo)

Rows (every number must be finite, or the script fails):

- extraction: images/s of :class:`FeatureExtractor`'s pass over synthetic lossless WebP shards the
  script writes itself, at each DataLoader worker count, against ``encode_image`` alone on
  preprocessed batches already on the device (the model-only forward), with AMP;
- AMP vs fp32: the zero-shot predictions of the same images with and without autocast (the
  fraction that agree, and the largest logit difference);
- SEraser: images/s of the batched test-time prompt tuning (``SEraser.tune``, paper defaults:
  20 steps, 256 images per batch) on synthetic unit features;
- RaVL: seconds per fine-tuning step (token regions, one forward + backward of the image tower,
  CLIP + region losses, AdamW), bf16 autocast on CUDA as ``ravl`` trains;
- DDP: seconds per DistributedDataParallel step of the image tower, world size 1 (nccl on
  CUDA, gloo on a CPU), initialised in-process through a ``FileStore`` in the temp dir.

Models are built with ``pretrained=None`` (random init): nothing is downloaded.  Everything is
written under a temporary directory that is removed at the end.  On failure: one line on
stderr naming the check, exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ASSETS = REPO / "src" / "clip_robust_plugins" / "assets"
CLASSNAMES = ["square", "diamond"]


@dataclasses.dataclass(frozen=True)
class Mode:
    """The sizes of one mode: ``full`` on CUDA, ``reduced`` on a CPU (or when asked)."""

    name: str
    model: str
    device: str
    images: int
    image_size: int
    batch_size: int
    workers: tuple[int, ...]
    seraser_images: int
    seraser_steps: int
    train_batch: int
    train_steps: int
    warmup_steps: int
    forward_seconds: float
    #: torch threads outside the extraction pass (None: torch's own); the pass follows the thread budget
    threads: int | None


FULL = Mode("full", "ViT-B-32", "cuda", images=4096, image_size=224, batch_size=256, workers=(4, 8, 16),
            seraser_images=1024, seraser_steps=20, train_batch=64, train_steps=10, warmup_steps=2,
            forward_seconds=3.0, threads=None)
REDUCED = Mode("reduced", "crp-tiny", "cpu", images=48, image_size=32, batch_size=16, workers=(0, 1),
               seraser_images=16, seraser_steps=2, train_batch=8, train_steps=2, warmup_steps=1, forward_seconds=0.5,
               threads=1)  # one thread: a shared CPU's OpenMP barriers make small ops slow with two


class CheckFailed(Exception):
    """One check went wrong: the message names it."""


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(mode: Mode):
    import logging

    import open_clip

    if mode.model == "crp-tiny":
        open_clip.add_model_config(ASSETS / "crp-tiny.json")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": intended (random init)
    try:
        model, _, transform = open_clip.create_model_and_transforms(mode.model, pretrained=None)
    finally:
        logging.getLogger().setLevel(level)
    return model.to(mode.device).eval(), transform, open_clip.get_tokenizer(mode.model)


def text_head(model, tokenizer, device: str):
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSNAMES]).to(device)).float(), dim=-1)


def extractor(model, transform, mode: Mode, workers: int, amp: bool):
    from clip_robust_plugins.features import FeatureCache, FeatureExtractor

    return FeatureExtractor(model, transform, model_type="open_clip", model_name=mode.model, pretrained="random-init",
                            device=mode.device, amp=amp, batch_size=mode.batch_size, num_workers=workers,
                            cache=FeatureCache(None), progress=False)


def model_only_forward(model, transform, dataset, mode: Mode) -> float:
    """images/s of ``encode_image`` on preprocessed batches already on the device, with AMP."""
    import torch

    from clip_robust_plugins.features import autocast

    images = []
    for _, image, _ in dataset.samples("test", transform):
        images.append(image)
        if len(images) == mode.batch_size:
            break
    batch = torch.stack(images).to(mode.device)
    with torch.no_grad(), autocast(mode.device, True):
        model.encode_image(batch)
        sync(mode.device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < mode.forward_seconds:
            model.encode_image(batch)
            n += len(batch)
        sync(mode.device)
    return n / (time.perf_counter() - t0)


def extraction_rows(model, transform, dataset, mode: Mode) -> list[dict]:
    forward = model_only_forward(model, transform, dataset, mode)
    rows = []
    for workers in mode.workers:
        ext = extractor(model, transform, mode, workers, amp=True)
        ext.extract(dataset, "gpu_check", "test", ["image"])
        rate = mode.images / ext.extracted[-1]["seconds"]
        rows.append({"check": "extraction", "setting": f"{workers} DataLoader workers, AMP, batch {mode.batch_size}",
                     "value": rate, "unit": "images/s", "forward": forward, "ratio": rate / forward})
    return rows


def amp_rows(model, transform, dataset, mode: Mode, head) -> list[dict]:
    """Zero-shot predictions of every image with and without autocast (the fp32 text head for both)."""
    logits = {}
    for amp in (True, False):
        ext = extractor(model, transform, mode, mode.workers[-1], amp=amp)
        feats = ext.extract(dataset, "gpu_check", "test", ["image"])["image"].features
        logits[amp] = 100.0 * feats.float() @ head.cpu().T
    equal = float((logits[True].argmax(1) == logits[False].argmax(1)).float().mean())
    diff = float((logits[True] - logits[False]).abs().max())
    setting = f"{len(logits[True])} images, {len(CLASSNAMES)} classes"
    return [{"check": "AMP vs fp32: predictions equal", "setting": setting, "value": equal, "unit": "fraction"},
            {"check": "AMP vs fp32: max abs logit diff", "setting": setting + ", logit scale 100", "value": diff,
             "unit": "logit"}]


def seraser_row(model, tokenizer, mode: Mode, head) -> dict:
    import torch
    import torch.nn.functional as F

    from clip_robust_plugins.mitigations.seraser import PromptEncoder, SEraser, SEraserConfig

    gen = torch.Generator().manual_seed(0)
    dim = int(head.shape[1])
    n, views = mode.seraser_images, 4

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1).to(mode.device)

    raw, fg, bg = unit(n, dim), unit(n, views, dim), unit(n, views, dim)
    encoder = PromptEncoder(model, tokenizer, CLASSNAMES, device=mode.device)
    config = SEraserConfig(steps=mode.seraser_steps)
    SEraser(SEraserConfig(steps=1, batch_size=8)).tune(encoder, raw[:8], fg[:8], bg[:8], None, 100.0, mode.device)
    sync(mode.device)
    t0 = time.perf_counter()
    out = SEraser(config).tune(encoder, raw, fg, bg, None, 100.0, mode.device)
    sync(mode.device)
    seconds = time.perf_counter() - t0
    if not all(torch.isfinite(r.logits).all() for r in out):
        raise CheckFailed("SEraser: non-finite tuned logits")
    return {"check": "SEraser batched tuning", "setting": f"{n} images, {config.steps} steps, batch {config.batch_size}",
            "value": n / seconds, "unit": "images/s"}


def _train_inputs(model, mode: Mode):
    import torch

    gen = torch.Generator().manual_seed(0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    grid = model.visual.grid_size
    images = torch.randn(mode.train_batch, 3, size, size, generator=gen).to(mode.device)
    regions = 4
    weights = torch.rand(mode.train_batch, regions, *grid, generator=gen).to(mode.device)
    labels = torch.randint(0, len(CLASSNAMES), (mode.train_batch,), generator=gen).to(mode.device)
    spurious = (torch.rand(mode.train_batch, regions, generator=gen) < 0.3).to(mode.device)
    return images, weights, labels, spurious


def ravl_row(model, mode: Mode, head) -> dict:
    """Seconds per RaVL step with token regions (what ``ravl``'s ``_train`` does per batch)."""
    import copy

    import torch
    import torch.nn.functional as F

    from clip_robust_plugins.mitigations.ravl.losses import clip_loss, label_to_region_loss, region_to_label_loss
    from clip_robust_plugins.mitigations.ravl.views import encode_with_token_regions

    train = copy.deepcopy(model).train()
    params = list(train.visual.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1)
    images, weights, labels, spurious = _train_inputs(model, mode)
    valid = torch.ones_like(spurious)
    label_emb = head.to(mode.device)
    use_amp = mode.device.startswith("cuda")
    times = []
    for step in range(mode.train_steps + mode.warmup_steps):
        sync(mode.device)
        t0 = time.perf_counter()
        with torch.autocast(torch.device(mode.device).type, dtype=torch.bfloat16, enabled=use_amp):
            image_emb, region_emb = encode_with_token_regions(train, images, weights)
        image_emb, region_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(region_emb.float(), dim=-1)
        loss = 0.5 * clip_loss(image_emb, label_emb[labels], labels, 0.07) + 0.5 * (
            region_to_label_loss(region_emb, valid & ~spurious, labels, label_emb, 0.07)
            + label_to_region_loss(region_emb, valid, spurious, labels, label_emb, 0.07))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(mode.device)
        if step >= mode.warmup_steps:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise CheckFailed("RaVL step: non-finite loss")
    return {"check": "RaVL fine-tuning step", "setting": f"batch {mode.train_batch}, 4 token regions, "
            f"{'bf16 autocast' if use_amp else 'fp32'}", "value": statistics.median(times), "unit": "s/step"}


def ddp_row(model, mode: Mode, work: Path) -> dict:
    """Seconds per DDP step of the image tower, world size 1, initialised through a FileStore."""
    import copy

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    backend = "nccl" if mode.device.startswith("cuda") else "gloo"
    store = dist.FileStore(str(work / "ddp_store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        visual = copy.deepcopy(model.visual).train()
        ddp = torch.nn.parallel.DistributedDataParallel(visual, device_ids=[0] if backend == "nccl" else None)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-5)
        images, _, labels, _ = _train_inputs(model, mode)
        use_amp = mode.device.startswith("cuda")
        times = []
        for step in range(mode.train_steps + mode.warmup_steps):
            sync(mode.device)
            t0 = time.perf_counter()
            with torch.autocast(torch.device(mode.device).type, dtype=torch.bfloat16, enabled=use_amp):
                emb = ddp(images)
            emb = F.normalize(emb.float(), dim=-1)
            loss = F.cross_entropy(100.0 * emb @ emb.T, torch.arange(len(emb), device=emb.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces the gradients here
            opt.step()
            sync(mode.device)
            if step >= mode.warmup_steps:
                times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise CheckFailed("DDP step: non-finite loss")
    finally:
        dist.destroy_process_group()
    return {"check": "DDP step (world size 1)", "setting": f"{backend}, image tower, batch {mode.train_batch}",
            "value": statistics.median(times), "unit": "s/step"}


def run_checks(mode: Mode, work: Path, log) -> list[dict]:
    sys.path.insert(0, str(BENCH))
    import bench_extraction as bx

    from clip_robust_plugins.datasets.wds import GroupedShards

    data = work / "data"
    try:
        # >= 2 shards per worker, so every worker of the largest count reads some
        shard = max(1, min(128, mode.images // (2 * max(mode.workers + (1,)))))
        bx.make_shards(data, mode.images, mode.image_size, seed=0, max_count=shard)
        log(f"shards: {mode.images} images at {mode.image_size} px in {data}")
        model, transform, tokenizer = build_model(mode)
        dataset = GroupedShards(data)
        head = text_head(model, tokenizer, mode.device)
    except Exception as exc:
        raise CheckFailed(f"setup ({mode.model} on {mode.device}): {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    steps = [("extraction", lambda: extraction_rows(model, transform, dataset, mode)),
             ("AMP vs fp32", lambda: amp_rows(model, transform, dataset, mode, head)),
             ("SEraser", lambda: [seraser_row(model, tokenizer, mode, head)]),
             ("RaVL step", lambda: [ravl_row(model, mode, head)]),
             ("DDP step", lambda: [ddp_row(model, mode, work)])]
    rows = []
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            got = step()
        except CheckFailed:
            raise
        except Exception as exc:
            raise CheckFailed(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
        for row in got:
            for key in ("value", "forward", "ratio"):
                if key in row and not math.isfinite(row[key]):
                    raise CheckFailed(f"{name}: {row['check']}: {key} is {row[key]}")
        rows.extend(got)
        log(f"{name}: {time.perf_counter() - t0:.1f} s")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| check | setting | value | unit | model-only forward (images/s) | ratio |", "|---|---|---:|---|---:|---:|"]
    for r in rows:
        forward = f"{r['forward']:.1f}" if "forward" in r else ""
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        value = f"{r['value']:.4g}"
        lines.append(f"| {r['check']} | {r['setting']} | {value} | {r['unit']} | {forward} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="the CPU mode even where CUDA is available")
    parser.add_argument("--out", metavar="JSON", help="also write the table (and the settings) to this file")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        import torch

        mode = FULL if torch.cuda.is_available() and not args.reduced else REDUCED
        from clip_robust_plugins.features.threads import torch_threads

        threads = torch_threads(mode.threads) if mode.threads else contextlib.nullcontext()
        with tempfile.TemporaryDirectory(prefix="crp_gpu_check_") as tmp, threads:
            rows = run_checks(mode, Path(tmp), log)
    except CheckFailed as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 1
    info = {"mode": dataclasses.asdict(mode), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if mode.device.startswith("cuda") else None,
            "seconds": round(time.perf_counter() - t_start, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"gpu_check ({mode.name}: {mode.model}, {mode.device}{', ' + info['gpu'] if info['gpu'] else ''}), "
          f"{info['seconds']} s")
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, **info}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
