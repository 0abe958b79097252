"""Steady-state extraction throughput against the model's own forward, in one run.

    python3 bench/bench_extraction.py                      # 1,024 lossless 224 px webp, ViT-S-32 random init
    python3 bench/bench_extraction.py --workers 0 1 2      # also other DataLoader worker counts
    python3 bench/bench_extraction.py --model ViT-B-32 --device cuda --amp    # the GPU path

- limit: images/s of ``model.encode_image`` alone on already preprocessed batches (same batch
  size, precision and threads as the eval process);
- extraction: images/s of the extraction pass of a cold ``clip_benchmark_robust eval`` on the same
  shards (``robust.features_extracted[].seconds``: read, decode, preprocess, forward, checks; the
  model is built before the pass is timed).  ``cold - warm`` wall is printed too, but it also holds
  the model build and the text head now, since a warm run builds no model;
- decode: images/s of reading, decoding and preprocessing alone (one process), which bounds what
  the DataLoader workers can feed.
Prints the ratio extraction / limit and writes ``--output``.  The pass's own record flatters small
N (issue 21: 47.8 images/s at 1,024 images, 39.3 at 2,048); ``bench_pipeline.py`` measures the steady
rate as the wall difference of N and 2N cold evals instead, with clip_benchmark in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval as be  # noqa: E402 - shared helpers (console scripts, random checkpoints, machine info)

PROBE = r'''
import json, sys, time, torch, open_clip
from clip_robust_plugins.datasets.wds import GroupedShards
spec = json.loads(sys.argv[1])
model, _, transform = open_clip.create_model_and_transforms(spec["model"], pretrained=spec["checkpoint"])
model = model.to(spec["device"]).eval()
data = GroupedShards(spec["data"])
t0 = time.perf_counter(); images = []
for key, image, fields in data.samples("test", transform):
    images.append(image)
decode = len(images) / (time.perf_counter() - t0)
batch = torch.stack(images[: spec["batch_size"]]).to(spec["device"])
amp = torch.autocast(torch.device(spec["device"]).type, enabled=spec["amp"])
with torch.no_grad(), amp:
    model.encode_image(batch)  # warm-up
    if spec["device"].startswith("cuda"): torch.cuda.synchronize()
    t0 = time.perf_counter(); n = 0
    while time.perf_counter() - t0 < spec["seconds"]:
        model.encode_image(batch); n += len(batch)
    if spec["device"].startswith("cuda"): torch.cuda.synchronize()
    forward = n / (time.perf_counter() - t0)
print(json.dumps({"decode_images_per_s": decode, "forward_images_per_s": forward, "threads": torch.get_num_threads()}))
'''


def make_shards(root: Path, n: int, size: int, seed: int, max_count: int = 128) -> None:
    from clip_robust_plugins import two_field_schema, write_grouped_dataset
    from clip_robust_plugins.datasets.wds import EncodedImage

    rng = np.random.default_rng(seed)

    def items():
        for i in range(n):
            y, a = i % 2, (i // 2) % 2
            pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).resize((size, size), Image.BICUBIC)
            buf = io.BytesIO()
            image.save(buf, format="WEBP", lossless=True)
            yield f"img_{i:06d}", EncodedImage("webp", buf.getvalue()), {"y": y, "a": a}, None, None

    schema = two_field_schema(["square", "diamond"], ["land", "water"])
    write_grouped_dataset(root, schema, ["a photo of a {c}."], {"test": items()}, max_count=max_count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=str(Path(__file__).with_name("results_extraction.json")))
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_extraction_"))
    data = work / "data"
    make_shards(data, args.n, args.image_size, seed=0)
    checkpoint = work / f"{args.model}_random.safetensors"
    be.save_random_checkpoint(args.model, checkpoint)
    spec = {"model": args.model, "checkpoint": str(checkpoint), "device": args.device, "data": str(data),
            "batch_size": args.batch_size, "amp": args.amp, "seconds": 20.0}
    probe = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], capture_output=True, text=True, check=True)
    limit = json.loads(probe.stdout.strip().splitlines()[-1])
    robust = be.console_script("clip_benchmark_robust")
    rows = {}
    for workers in args.workers:
        cache = work / f"cache_{workers}"
        cmd = [robust, "eval", "--dataset", "wds/bench", "--dataset_root", str(data), "--model", args.model,
               "--pretrained", str(checkpoint), "--batch_size", str(args.batch_size), "--num_workers", str(workers),
               "--feature_cache", str(cache), "--output", str(work / "out.json"), "--quiet"]
        cmd += [] if args.amp else ["--no_amp"]
        colds, warms, passes = [], [], []
        for _ in range(args.repeats):
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            colds.append(be.run_timed(cmd, label="cold")[0])
            passes.append(json.loads((work / "out.json").read_text())["robust"]["features_extracted"][0]["seconds"])
            warms.append(be.run_timed(cmd, label="warm")[0])
        cold, warm, seconds = statistics.median(colds), statistics.median(warms), statistics.median(passes)
        rate = args.n / seconds
        rows[workers] = {"cold_s": cold, "warm_s": warm, "pass_s": seconds, "extraction_images_per_s": rate,
                         "ratio_to_forward": rate / limit["forward_images_per_s"]}
    results = {"script": "bench/bench_extraction.py", "settings": vars(args), "machine": be.machine_info(),
               "limit": limit, "rows": rows, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(f"model-only forward: {limit['forward_images_per_s']:.1f} img/s ({limit['threads']} threads); "
          f"decode+preprocess alone: {limit['decode_images_per_s']:.1f} img/s")
    for workers, row in rows.items():
        print(f"workers {workers}: pass {row['pass_s']:.1f} s -> {row['extraction_images_per_s']:.1f} img/s = "
              f"{row['ratio_to_forward']:.2f}x the forward (cold {row['cold_s']:.1f} s, warm {row['warm_s']:.1f} s wall)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
