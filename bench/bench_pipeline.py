"""The CPU pipeline end to end, in one run: steady extraction against the model-only forward,
and a cold ``clip_benchmark_robust eval`` against ``clip_benchmark eval`` on the same shards.

    python3 bench/bench_pipeline.py                        # N = 1,024 (and 2N) lossless 224 px WebP, ViT-S-32 random init
    python3 bench/bench_pipeline.py --n 512 --repeats 3
    python3 bench/bench_pipeline.py --budgets 0:2 1:1 1:2 2:2   # also other workers:threads splits (the rule's study)

Every eval runs as a fresh process with each tool's DEFAULT flags (no --batch_size,
--num_workers or precision flag), alternated round by round so load changes on a shared
machine hit every row alike.  Each round runs:

- forward: ``model.encode_image`` alone on the first batches of the shards, decoded and
  preprocessed once by the model's own transform, same batch size, precision and thread
  as the eval's pass, and every core's torch threads (the machine's limit, which the pipeline is
  compared with); measured every round so its own drift is visible;
- ours N, ours 2N: cold ``clip_benchmark_robust eval`` (new empty ``--feature_cache``) on N and
  on 2N images (the 2N shards hold the N ones plus N more).  Steady extraction is
  ``N / (wall_2N - wall_N)``: start-up, imports, model build and the text head cancel;
- clip_benchmark N: clip_benchmark 1.6.2's own ``eval`` through ``bench_eval``'s shim (the
  numpy >= 2.4 ``accuracy()`` fix only), its defaults: batch 64, 4 workers, AMP on, which on
  a CPU is bf16 autocast;
- ours N ``--amp``: our cold eval at clip_benchmark's precision (bf16 autocast on a CPU), so
  the comparison is also shown with the same arithmetic on both sides.
- clip_benchmark N ``--no_amp``: its eval in fp32, our default's precision on a CPU, so our
  default eval is also compared with the same arithmetic (``--no_fp32_baseline`` skips it).

Peak RSS of every eval (``wait4``: the largest of the process and its reaped DataLoader
workers) at N and 2N shows whether memory is flat in the number of images.  acc1 must be
equal between our fp32 run and clip_benchmark's (at N) up to bf16: it is printed, not enforced.
Writes ``--output`` (default ``bench/results_pipeline.json``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval as be  # noqa: E402 - console scripts, the shim, random checkpoints, machine info
import bench_extraction as bx  # noqa: E402 - the lossless WebP shards

FORWARD = r'''
import json, sys, time, torch, open_clip, logging
from clip_robust_plugins.datasets.wds import GroupedShards
spec = json.loads(sys.argv[1])
logging.getLogger().setLevel(logging.ERROR)
model, _, transform = open_clip.create_model_and_transforms(spec["model"], pretrained=spec["checkpoint"])
model = model.eval()
images = []
t0 = time.perf_counter()
for key, image, fields in GroupedShards(spec["data"]).samples("test", transform):
    images.append(image)
    if len(images) == spec["images"]:
        break
decode = len(images) / (time.perf_counter() - t0)
bs = spec["batch_size"]
batches = [torch.stack(images[i:i + bs]) for i in range(0, len(images) - bs + 1, bs)]
torch.set_num_threads(spec["threads"])
with torch.no_grad(), torch.autocast("cpu", enabled=spec["amp"]):
    model.encode_image(batches[0])  # warm-up
    t0 = time.perf_counter(); n = 0
    while time.perf_counter() - t0 < spec["seconds"]:
        for b in batches:
            model.encode_image(b); n += len(b)
    forward = n / (time.perf_counter() - t0)
print(json.dumps({"forward_images_per_s": forward, "decode_images_per_s": decode, "threads": torch.get_num_threads()}))
'''

#: runs our CLI with the forward's threads forced (``--budgets W:T``; the workers come from --num_workers)
FORCED = r'''
import sys
import clip_robust_plugins.features.extractor as m
from clip_robust_plugins.features.threads import ThreadBudget
threads = int(sys.argv[1])
m.thread_budget = lambda cores, device, n=None: ThreadBudget(cores, int(n or 0), threads, True)
from clip_robust_plugins.cli import main
sys.exit(main(sys.argv[2:]))
'''


def run_rss(cmd: list[str], label: str) -> dict:
    """Like :func:`run_measured`, with the peak RSS from ``wait4`` (this child alone)."""
    load = be.load_avg()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=be.REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.stderr.write(stdout[-2000:] + stderr[-4000:])
        raise SystemExit(f"bench_pipeline: {label} failed (exit {proc.returncode}): {be.shell(cmd)}")
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "load_avg": load,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}


class Commands:
    """The command lines of one run (shards, checkpoint and work dir fixed)."""

    def __init__(self, work: Path, data: dict[str, Path], checkpoint: Path, model: str, patch: bool):
        self.work, self.data, self.checkpoint, self.model = work, data, checkpoint, model
        self.robust = be.console_script("clip_benchmark_robust")
        self.baseline = [sys.executable, str(work / "clip_benchmark_shim.py"), *(["--patch_accuracy"] if patch else [])]
        self.count = 0

    def _common(self, size: str) -> list[str]:
        return ["eval", "--dataset", "wds/bench", "--dataset_root", str(self.data[size]), "--task",
                "zeroshot_classification", "--model", self.model, "--pretrained", str(self.checkpoint)]

    def out(self, tag: str) -> Path:
        self.count += 1
        return self.work / "out" / f"{tag}_{self.count}.json"

    def ours(self, size: str, extra: list[str] = (), forced_threads: int | None = None) -> tuple[list[str], Path]:
        out = self.out(f"ours_{size}")
        cache = self.work / "caches" / f"cache_{self.count}"
        shutil.rmtree(cache, ignore_errors=True)
        prefix = [self.robust] if forced_threads is None else [sys.executable, "-c", FORCED, str(forced_threads)]
        return [*prefix, *self._common(size), "--feature_cache", str(cache), "--output", str(out), "--quiet", *extra], out

    def clip_benchmark(self, size: str, extra: list[str] = ()) -> tuple[list[str], Path]:
        out = self.out(f"cb_{size}")
        return [*self.baseline, *self._common(size), "--output", str(out), *extra], out


def acc1(path: Path) -> float | None:
    return json.loads(path.read_text()).get("metrics", {}).get("acc1")


def robust_record(path: Path) -> dict:
    rec = json.loads(path.read_text())["robust"]["features_extracted"][0]
    return {k: rec.get(k) for k in ("n", "seconds", "num_workers", "torch_threads")}


def spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"values": [round(v, 3) for v in values], "median": round(med, 3),
            "range_pct_of_median": round(100 * (max(values) - min(values)) / med, 1) if med else None}


def one_round(cmds: Commands, args, threads: int, log) -> dict:
    """One round: forward probe, ours N / 2N, clip_benchmark N, ours N --amp (and the budget study)."""
    row: dict = {}
    spec = {"model": args.model, "checkpoint": str(cmds.checkpoint), "data": str(cmds.data["N"]), "amp": False,
            "batch_size": 64, "images": 4 * 64, "threads": threads, "seconds": args.probe_seconds}
    probe = subprocess.run([sys.executable, "-c", FORWARD, json.dumps(spec)], capture_output=True, text=True, check=True)
    row["forward"] = json.loads(probe.stdout.strip().splitlines()[-1])
    log(f"forward {row['forward']['forward_images_per_s']:.1f} img/s ({threads} threads)")
    for size in ("N", "2N"):
        cmd, out = cmds.ours(size)
        row[f"ours_{size}"] = {**run_rss(cmd, f"ours {size}"), **robust_record(out), "acc1": acc1(out)}
        log(f"ours {size}: {row[f'ours_{size}']['wall_s']:.1f} s")
    cmd, out = cmds.clip_benchmark("N")
    row["clip_benchmark_N"] = {**run_rss(cmd, "clip_benchmark N"), "acc1": acc1(out)}
    log(f"clip_benchmark N: {row['clip_benchmark_N']['wall_s']:.1f} s")
    if not args.no_fp32_baseline:
        cmd, out = cmds.clip_benchmark("N", ["--no_amp"])
        row["clip_benchmark_N_no_amp"] = {**run_rss(cmd, "clip_benchmark N --no_amp"), "acc1": acc1(out)}
        log(f"clip_benchmark N --no_amp: {row['clip_benchmark_N_no_amp']['wall_s']:.1f} s")
    if not args.no_amp_row:
        cmd, out = cmds.ours("N", ["--amp"])
        row["ours_N_amp"] = {**run_rss(cmd, "ours N --amp"), **robust_record(out), "acc1": acc1(out)}
        log(f"ours N --amp: {row['ours_N_amp']['wall_s']:.1f} s")
    for budget in args.budgets:
        workers, forced = (int(x) for x in budget.split(":"))
        walls = {}
        for size in ("N", "2N"):
            cmd, out = cmds.ours(size, ["--num_workers", str(workers)], forced_threads=forced)
            walls[size] = run_rss(cmd, f"budget {budget} {size}")["wall_s"]
        row.setdefault("budgets", {})[budget] = {**walls, "steady_images_per_s": args.n / (walls["2N"] - walls["N"])}
        log(f"budget {budget}: {row['budgets'][budget]}")
    return row


def summarize(rounds: list[dict], n: int) -> dict:
    forward = [r["forward"]["forward_images_per_s"] for r in rounds]
    steady = [n / (r["ours_2N"]["wall_s"] - r["ours_N"]["wall_s"]) for r in rounds]
    cold = [r["ours_N"]["wall_s"] / r["clip_benchmark_N"]["wall_s"] for r in rounds]
    out = {
        "forward_images_per_s": spread(forward),
        "steady_images_per_s": spread(steady),
        "steady_over_forward_per_round": [round(s / f, 3) for s, f in zip(steady, forward)],
        "steady_over_forward": round(statistics.median(steady) / statistics.median(forward), 3),
        "ours_N_s": spread([r["ours_N"]["wall_s"] for r in rounds]),
        "ours_2N_s": spread([r["ours_2N"]["wall_s"] for r in rounds]),
        "clip_benchmark_N_s": spread([r["clip_benchmark_N"]["wall_s"] for r in rounds]),
        "cold_over_clip_benchmark_per_round": [round(c, 3) for c in cold],
        "cold_over_clip_benchmark": round(statistics.median(cold), 3),
        "peak_rss_mib": {k: statistics.median(r[k]["peak_rss_mib"] for r in rounds) for k in ("ours_N", "ours_2N")},
    }
    out["peak_rss_2N_over_N"] = round(out["peak_rss_mib"]["ours_2N"] / out["peak_rss_mib"]["ours_N"], 3)
    if "ours_N_amp" in rounds[0]:
        amp = [r["ours_N_amp"]["wall_s"] / r["clip_benchmark_N"]["wall_s"] for r in rounds]
        out["ours_N_amp_s"] = spread([r["ours_N_amp"]["wall_s"] for r in rounds])
        out["cold_amp_over_clip_benchmark_per_round"] = [round(c, 3) for c in amp]
        out["cold_amp_over_clip_benchmark"] = round(statistics.median(amp), 3)
    if "clip_benchmark_N_no_amp" in rounds[0]:
        fp32 = [r["ours_N"]["wall_s"] / r["clip_benchmark_N_no_amp"]["wall_s"] for r in rounds]
        out["clip_benchmark_N_no_amp_s"] = spread([r["clip_benchmark_N_no_amp"]["wall_s"] for r in rounds])
        out["cold_over_clip_benchmark_no_amp_per_round"] = [round(c, 3) for c in fp32]
        out["cold_over_clip_benchmark_no_amp"] = round(statistics.median(fp32), 3)
    if "budgets" in rounds[0]:
        out["budgets"] = {b: spread([r["budgets"][b]["steady_images_per_s"] for r in rounds]) for b in rounds[0]["budgets"]}
    return out


def print_report(results: dict) -> None:
    s, r0, m = results["summary"], results["rounds"][0], results["machine"]
    print(f"\nmachine: {m['affinity_cpus']} cores ({m.get('cpu_model', m['processor'])}), torch {m['torch']}; "
          f"load avg {m['load_avg_start']} -> {m['load_avg_end']} (shared machine: not clean numbers)")
    print(f"budget of our pass (default flags): {r0['ours_N']['num_workers']} DataLoader workers, "
          f"{r0['ours_N']['torch_threads']} torch threads")
    f, st = s["forward_images_per_s"], s["steady_images_per_s"]
    print(f"model-only forward      {f['median']:8.1f} img/s  rounds {f['values']} (moved {f['range_pct_of_median']}%)")
    print(f"steady extraction N/2N  {st['median']:8.1f} img/s  rounds {st['values']} (moved {st['range_pct_of_median']}%)")
    print(f"  ratio                 {s['steady_over_forward']:8.3f}        per round {s['steady_over_forward_per_round']}  (target >= 0.8)")
    print(f"cold eval, ours N       {s['ours_N_s']['median']:8.1f} s      rounds {s['ours_N_s']['values']}")
    print(f"clip_benchmark eval N   {s['clip_benchmark_N_s']['median']:8.1f} s      rounds {s['clip_benchmark_N_s']['values']} "
          f"(moved {s['clip_benchmark_N_s']['range_pct_of_median']}%)")
    print(f"  ratio                 {s['cold_over_clip_benchmark']:8.3f}        per round {s['cold_over_clip_benchmark_per_round']}  (target <= 0.85)")
    if "cold_amp_over_clip_benchmark" in s:
        print(f"ours N --amp (bf16)     {s['ours_N_amp_s']['median']:8.1f} s      ratio {s['cold_amp_over_clip_benchmark']:.3f} "
              f"per round {s['cold_amp_over_clip_benchmark_per_round']}  (same arithmetic as clip_benchmark's default)")
    if "cold_over_clip_benchmark_no_amp" in s:
        print(f"clip_benchmark --no_amp {s['clip_benchmark_N_no_amp_s']['median']:8.1f} s      ours N (fp32) / it "
              f"{s['cold_over_clip_benchmark_no_amp']:.3f} per round {s['cold_over_clip_benchmark_no_amp_per_round']}  "
              "(both fp32: same arithmetic as our default)")
    print(f"peak RSS ours N / 2N    {s['peak_rss_mib']['ours_N']:.0f} / {s['peak_rss_mib']['ours_2N']:.0f} MiB "
          f"(ratio {s['peak_rss_2N_over_N']})")
    print(f"acc1 ours / clip_benchmark (N, round 1): {r0['ours_N']['acc1']} / {r0['clip_benchmark_N']['acc1']}")
    for budget, v in s.get("budgets", {}).items():
        print(f"budget {budget} (workers:threads): steady {v['median']:.1f} img/s = {v['median'] / f['median']:.3f}x "
              f"the forward, rounds {v['values']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="images of the small run (the large one has 2N)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (every row once per round)")
    parser.add_argument("--probe_seconds", type=float, default=10.0)
    parser.add_argument("--budgets", nargs="*", default=[], metavar="W:T",
                        help="also steady extraction with W DataLoader workers and T forward threads")
    parser.add_argument("--no_amp_row", action="store_true", help="skip our --amp row")
    parser.add_argument("--no_fp32_baseline", action="store_true",
                        help="skip clip_benchmark's --no_amp row (fp32 on both sides, our default's arithmetic)")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--output", default=str(Path(__file__).with_name("results_pipeline.json")))
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    info = be.machine_info()
    info["load_avg_start"] = be.load_avg()
    patch = be.numpy_breaks_clip_benchmark()
    (work / "clip_benchmark_shim.py").write_text(be.SHIM)
    data = {"N": work / "data_N", "2N": work / "data_2N"}
    for size, n in (("N", args.n), ("2N", 2 * args.n)):
        if not (data[size] / "groups.json").is_file():
            # same seed: 2N starts with the N images; >= 8 shards, so clip_benchmark's 4 workers all get some
            bx.make_shards(data[size], n, args.image_size, seed=0, max_count=max(1, min(128, args.n // 8)))
    checkpoint = work / f"{args.model}_random.safetensors"
    if not checkpoint.is_file():
        be.save_random_checkpoint(args.model, checkpoint)
    log(f"shards and checkpoint in {work}")
    cmds = Commands(work, data, checkpoint, args.model, patch)
    threads = len(os.sched_getaffinity(0))  # the forward alone gets every core: the machine's limit
    rounds = []
    for i in range(args.repeats):
        rounds.append(one_round(cmds, args, threads, log))
        log(f"round {i + 1} done")
    info["load_avg_end"] = be.load_avg()
    results = {"script": "bench/bench_pipeline.py", "argv": sys.argv[1:], "settings": vars(args), "machine": info,
               "numpy_breaks_plain_clip_benchmark": patch, "rounds": rounds, "summary": summarize(rounds, args.n),
               "total_seconds": round(time.perf_counter() - t_start, 1),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print_report(results)
    print(f"wrote {args.output}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
