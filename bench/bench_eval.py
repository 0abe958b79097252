#!/usr/bin/env python3
"""Wall-clock benchmark: ``clip_benchmark eval`` vs ``clip_benchmark_robust eval`` (cold/warm cache).

Run by hand from the repository root (never by the tests)::

    python3 bench/bench_eval.py                 # default run: 2.5 min on an idle 2-CPU machine
    python3 bench/bench_eval.py --with_vit      # also ViT-S-32 (random init) on a smaller split

In ONE run, on the same shards and the same checkpoint, it

1. generates ``robust/spurious_shapes`` shards once into a work dir with
   ``clip_robust_plugins.datasets.spurious_shapes.generate`` (sizes: ``--train_size``,
   ``--val_size``, ``--test_size``, ``--image_size``; only the ``--split`` split, ``test``
   by default, is evaluated);
2. times, each ``--repeats`` times in a fresh subprocess, interleaved round by round so
   load drift on a shared machine hits every command alike, and reports the median:

   a. baseline: clip_benchmark 1.6.2's own ``eval`` code path on ``wds/spurious_shapes``;
   b. ``clip_benchmark_robust eval`` with the same flags (group metrics on, since the
      root has ``groups.json``), with a fresh empty ``--feature_cache`` each repeat (cold);
   c. the same with a warm ``--feature_cache`` (filled by round 1's (b), which starts from an
      empty directory like every (b));
   d. with ``--with_vit``: a/b/c again with ``--model ViT-S-32`` and a random-init
      checkpoint the script saves, on a smaller test split (``--vit_test_size``), since
      the tiny model is not representative of real extraction cost;

   plus process start-up rows (``python -c pass``, ``python -c "import clip_robust_plugins.cli"``,
   ``python -c "import clip_benchmark.cli"``), and one in-process phase breakdown
   (imports, model load, text head, decoding, forward passes, cache write/read);
3. prints a table (command, median seconds, ratio b/a and c/a) and writes every number
   to ``--output`` (default ``bench/results_eval.json``) with machine information;
4. checks that acc1 of (a) equals ``acc1`` of (b) (and of (c)) and prints OK/MISMATCH.

Why the baseline runs through a shim (``<work_dir>/clip_benchmark_shim.py``):

- clip_benchmark 1.6.2's zero-shot ``accuracy()`` calls ``float()`` on a one-element
  numpy array, which numpy >= 2.4 rejects, so plain ``clip_benchmark eval`` crashes at
  the very end of a zero-shot run.  The script detects this (it tries exactly that
  ``float()`` call); where it fails, the shim replaces
  ``clip_benchmark.metrics.zeroshot_classification.accuracy`` with
  ``clip_robust_plugins.compat.accuracy`` (same numbers, ``.item()`` instead of
  ``float(array)``) and otherwise calls ``clip_benchmark.cli.main()`` unchanged.
- Plain clip_benchmark / open_clip do not know the model name ``crp-tiny``: the shim calls
  ``open_clip.add_model_config(<assets/crp-tiny.json>)`` before ``main()``.
- Where neither is needed (numpy < 2.4 and an open_clip built-in model such as
  ``ViT-S-32``), the plain ``clip_benchmark`` console script is used instead.

Both tools run from the console scripts next to the interpreter (not the pyenv shims),
with the same ``--batch_size``, ``--num_workers`` (0 by default) and AMP setting
(fp32, ``--no_amp``, by default: on a CPU bf16 autocast is slower for these models and
inexact; ``--amp`` turns it on for both).

The checkpoint is the shipped ``src/clip_robust_plugins/assets/crp-tiny_spurious_shapes.safetensors``
when it exists; otherwise (or with ``--random_checkpoint``) a random-init ``crp-tiny``
saved into the work dir; ``--checkpoint PATH`` picks one explicitly.  Timings are only
comparable between rows of one run; the machine's load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "clip_robust_plugins" / "assets"
TINY = "crp-tiny"
TINY_CONFIG = ASSETS / f"{TINY}.json"
SHIPPED_CHECKPOINT = ASSETS / f"{TINY}_spurious_shapes.safetensors"
DATASET = "wds/spurious_shapes"

SHIM = '''\
"""clip_benchmark's own CLI, with only what it needs to run here (written by bench/bench_eval.py).

    python3 clip_benchmark_shim.py [--add_model_config JSON]... [--patch_accuracy] eval ...

--add_model_config: open_clip.add_model_config(JSON) (clip_benchmark does not know crp-tiny);
--patch_accuracy: clip_benchmark 1.6.2's zero-shot accuracy() crashes on numpy >= 2.4;
replace it with clip_robust_plugins.compat.accuracy (same numbers).  Then
clip_benchmark.cli.main(), unchanged.
"""
import sys

args = sys.argv[1:]
configs, patch = [], False
while args and args[0] in ("--add_model_config", "--patch_accuracy"):
    if args[0] == "--patch_accuracy":
        patch, args = True, args[1:]
    else:
        configs.append(args[1])
        args = args[2:]
if configs:
    import open_clip

    for path in configs:
        open_clip.add_model_config(path)
if patch:
    import clip_benchmark.metrics.zeroshot_classification as zs
    from clip_robust_plugins.compat import accuracy

    zs.accuracy = accuracy
import clip_benchmark.cli

sys.argv = ["clip_benchmark", *args]
sys.exit(clip_benchmark.cli.main())
'''


# ----------------------------------------------------------------------------- helpers
def numpy_breaks_clip_benchmark() -> bool:
    """True when clip_benchmark 1.6.2's ``float(<1-element array>)`` raises (numpy >= 2.4)."""
    import numpy as np

    try:
        float(np.zeros(1))
    except TypeError:
        return True
    return False


def console_script(name: str) -> str:
    """The console script installed beside this interpreter (no pyenv shim), else PATH's."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"bench_eval: console script {name!r} not found")
    return found


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    import numpy
    import open_clip
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        from importlib.metadata import version

        info["clip_benchmark"] = version("clip-benchmark")
        info["clip_robust_plugins"] = version("clip-robust-plugins")
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_timed(cmd: list[str], *, env: dict | None = None, label: str = "") -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of one subprocess; its CPU seconds (user + sys) go to ``proc.cpu_seconds``."""
    c0 = children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    proc.cpu_seconds = children_cpu() - c0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"bench_eval: {label or cmd[0]} failed with exit code {proc.returncode}:\n  {shell(cmd)}")
    return seconds, proc


def shell(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


def ensure_data(root: Path, *, train: int, val: int, test: int, image_size: int, seed: int) -> dict:
    """Generate the shards once (reused when ``root`` already holds this exact config)."""
    from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate

    config = ShapesConfig(train_size=train, val_size=val, test_size=test, image_size=image_size, seed=seed)
    groups = root / "groups.json"
    if groups.is_file():
        stored = json.loads(groups.read_text()).get("generator", {}).get("config")
        if stored == config.to_json():
            return {"config": config.to_json(), "seconds": 0.0, "reused": True}
        shutil.rmtree(root)
    t0 = time.perf_counter()
    generate(root, config, progress=False)
    return {"config": config.to_json(), "seconds": round(time.perf_counter() - t0, 3), "reused": False}


def save_random_checkpoint(model_name: str, path: Path, config: Path | None = None, seed: int = 0) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    if config is not None:
        open_clip.add_model_config(str(config))
    import logging

    torch.manual_seed(seed)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded": intended here
    try:
        model = open_clip.create_model(model_name)
    finally:
        logging.getLogger().setLevel(level)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


# --------------------------------------------------------------------------- commands
class Suite:
    """The a/b/c command lines of one model on one dataset root."""

    def __init__(
        self,
        name: str,
        *,
        model: str,
        checkpoint: Path,
        data: Path,
        work: Path,
        args,
        patch_accuracy: bool,
        model_config: Path | None,
    ):
        self.name = name
        self.model = model
        self.checkpoint = checkpoint
        self.data = data
        self.work = work / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.common = [
            "eval",
            "--dataset",
            DATASET,
            "--dataset_root",
            str(data),
            "--task",
            "zeroshot_classification",
            "--split",
            args.split,
            "--model",
            model,
            "--pretrained",
            str(checkpoint),
            "--batch_size",
            str(args.batch_size),
            "--num_workers",
            str(args.num_workers),
        ] + ([] if args.amp else ["--no_amp"])
        shim_flags = (["--add_model_config", str(model_config)] if model_config else []) + (
            ["--patch_accuracy"] if patch_accuracy else []
        )
        if shim_flags:
            self.baseline_prefix = [sys.executable, str(work / "clip_benchmark_shim.py"), *shim_flags]
            self.baseline_kind = "shim: " + " ".join(f.lstrip("-") for f in shim_flags if f.startswith("--"))
        else:
            self.baseline_prefix = [console_script("clip_benchmark")]
            self.baseline_kind = "plain clip_benchmark console script"
        self.robust_prefix = [console_script("clip_benchmark_robust")]
        self.warm_cache = self.work / "warm_cache"
        self.counter = 0

    def _out(self, tag: str) -> Path:
        self.counter += 1
        return self.work / f"{tag}_{self.counter}.json"

    def command(self, which: str) -> tuple[list[str], Path]:
        """The command line for a (baseline), b (cold cache) or c (warm cache), and its output path."""
        out = self._out(which)
        if which == "a":
            return [*self.baseline_prefix, *self.common, "--output", str(out)], out
        if which == "b":
            cache = self.work / f"cold_cache_{self.counter}"
            shutil.rmtree(cache, ignore_errors=True)
            return [*self.robust_prefix, *self.common, "--feature_cache", str(cache), "--output", str(out)], out
        if which == "c":
            return [
                *self.robust_prefix,
                *self.common,
                "--feature_cache",
                str(self.warm_cache),
                "--output",
                str(out),
            ], out
        raise ValueError(which)

    def display(self, which: str) -> str:
        """A readable version of the command line (long paths shortened)."""
        cmd, _ = self.command(which)
        text = shell(cmd).replace(str(self.work.parent), "$WORK").replace(str(REPO) + "/", "")
        return text.replace(str(Path(sys.executable).parent) + "/", "")


def read_result(path: Path) -> dict:
    dump = json.loads(path.read_text())
    metrics = dump.get("metrics", {})
    robust = dump.get("robust", {})
    return {
        "acc1": metrics.get("acc1"),
        "acc5": metrics.get("acc5"),
        "mean_per_class_recall": metrics.get("mean_per_class_recall"),
        "n_metrics": len(metrics),
        "group_metric_keys": sorted(k for k in metrics if "/" in k)[:40],
        "features_extracted": robust.get("features_extracted"),
    }


def run_suite(suite: Suite, repeats: int, log) -> dict:
    """Rounds of a, b, c.  Round 1's (b) fills the (empty) warm cache, so it is a cold run too."""
    shutil.rmtree(suite.warm_cache, ignore_errors=True)
    rows = {k: {"seconds": [], "cpu_seconds": [], "results": []} for k in "abc"}
    for r in range(repeats):
        for which in "abc":
            cmd, out = suite.command(which)
            if r == 0 and which == "b":
                cmd[cmd.index("--feature_cache") + 1] = str(suite.warm_cache)
            seconds, proc = run_timed(cmd, label=f"{suite.name} {which}")
            rows[which]["seconds"].append(round(seconds, 3))
            rows[which]["cpu_seconds"].append(round(proc.cpu_seconds, 3))
            rows[which]["results"].append(read_result(out))
            rows[which]["argv"] = cmd  # the last round's
            log(f"[{suite.name}] round {r + 1}/{repeats} {which}: {seconds:6.2f} s  (load {load_avg()})")
    for which in "abc":
        rows[which]["median_s"] = round(statistics.median(rows[which]["seconds"]), 3)
        rows[which]["median_cpu_s"] = round(statistics.median(rows[which]["cpu_seconds"]), 3)
        rows[which]["display"] = suite.display(which)
    # warm runs must not have extracted anything; cold ones must have
    warm_ok = all(not res["features_extracted"] for res in rows["c"]["results"])
    cold_ok = all(res["features_extracted"] for res in rows["b"]["results"])
    acc = {w: sorted({res["acc1"] for res in rows[w]["results"]}, key=repr) for w in "abc"}
    a_acc = acc["a"][0] if len(acc["a"]) == 1 else None
    check = {
        "acc1_a": acc["a"],
        "acc1_b": acc["b"],
        "acc1_c": acc["c"],
        "equal": len(acc["a"]) == 1 and acc["b"] == acc["a"] and acc["c"] == acc["a"],
        "abs_diff_b_a": None if a_acc is None or len(acc["b"]) != 1 else abs(acc["b"][0] - a_acc),
        "warm_runs_extracted_nothing": warm_ok,
        "cold_runs_extracted": cold_ok,
    }
    return {
        "model": suite.model,
        "checkpoint": str(suite.checkpoint),
        "baseline_runs_via": suite.baseline_kind,
        "warm_cache_filled_by": "round 1's (b) run, into the empty warm cache dir",
        "commands": {w: {k: v for k, v in rows[w].items()} for w in "abc"},
        "ratio_b_over_a": round(rows["b"]["median_s"] / rows["a"]["median_s"], 3),
        "ratio_c_over_a": round(rows["c"]["median_s"] / rows["a"]["median_s"], 3),
        "cpu_ratio_b_over_a": round(rows["b"]["median_cpu_s"] / rows["a"]["median_cpu_s"], 3),
        "cpu_ratio_c_over_a": round(rows["c"]["median_cpu_s"] / rows["a"]["median_cpu_s"], 3),
        "acc1_check": check,
    }


def startup_rows(repeats: int, log) -> dict:
    py = sys.executable
    cmds = {
        "python -c pass": [py, "-c", "pass"],
        'python -c "import clip_robust_plugins.cli"': [py, "-c", "import clip_robust_plugins.cli"],
        'python -c "import clip_benchmark.cli"': [py, "-c", "import clip_benchmark.cli"],
    }
    out = {name: [] for name in cmds}
    cpu = {name: [] for name in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            seconds, proc = run_timed(cmd, label=name)
            out[name].append(round(seconds, 3))
            cpu[name].append(round(proc.cpu_seconds, 3))
    res = {
        name: {
            "seconds": s,
            "median_s": round(statistics.median(s), 3),
            "cpu_seconds": cpu[name],
            "median_cpu_s": round(statistics.median(cpu[name]), 3),
        }
        for name, s in out.items()
    }
    for name, row in res.items():
        log(f"[startup] {name}: {row['seconds']}")
    return res


# --------------------------------------------------------------------- phase probe
def phase_probe(spec: dict) -> dict:
    """Runs in a fresh process: where one robust eval's time goes (imports first, timed)."""
    t = time.perf_counter
    phases: dict[str, float] = {}
    t0 = t()
    import torch  # noqa: F401

    phases["import torch"] = t() - t0
    t0 = t()
    import open_clip  # noqa: F401

    phases["import open_clip (after torch)"] = t() - t0
    t0 = t()
    import clip_robust_plugins.cli  # noqa: F401

    phases["import clip_robust_plugins.cli (after open_clip)"] = t() - t0
    t0 = t()
    import clip_benchmark.cli  # noqa: F401

    phases["import clip_benchmark.cli (after the above; our CLI imports it lazily)"] = t() - t0

    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    from clip_robust_plugins.datasets.wds import GroupedShards
    from clip_robust_plugins.features import FeatureCache, FeatureExtractor
    from clip_robust_plugins.models import load_open_clip
    from clip_robust_plugins.plugins import build_plugin_manager, collect_registry

    t0 = t()
    collect_registry(build_plugin_manager([]))
    phases["plugin manager + registry"] = t() - t0
    t0 = t()
    if spec.get("model_config"):
        open_clip.add_model_config(spec["model_config"])
    model, transform, tokenizer = load_open_clip(spec["model"], spec["checkpoint"], device="cpu")
    model.eval()
    phases["model load (create_model_and_transforms + checkpoint)"] = t() - t0

    ds = GroupedShards(spec["data"])
    amp, bs, nw, split = spec["amp"], spec["batch_size"], spec["num_workers"], spec["split"]
    t0 = t()
    zero_shot_classifier(model, tokenizer, ds.classnames, ds.templates, "cpu", amp=amp)
    phases[f"text head ({len(ds.classnames)} classes x {len(ds.templates)} templates)"] = t() - t0

    # warm-up (first-use costs: PIL plugins, transforms) so neither reader below pays them alone
    next(iter(torch.utils.data.DataLoader(ds.samples(split, transform), batch_size=2, num_workers=0)))
    cb_ds = build_wds_dataset("spurious_shapes", transform=transform, split=split, data_dir=spec["data"])
    next(iter(torch.utils.data.DataLoader(cb_ds.batched(2), batch_size=None, num_workers=0)))
    t0 = t()
    batches = [
        images
        for _, images, _ in torch.utils.data.DataLoader(ds.samples(split, transform), batch_size=bs, num_workers=nw)
    ]
    n = sum(len(b) for b in batches)
    phases[f"data only, ours: read+decode+transform {n} images"] = t() - t0
    t0 = t()
    cb_ds = build_wds_dataset("spurious_shapes", transform=transform, split=split, data_dir=spec["data"])
    for _ in torch.utils.data.DataLoader(cb_ds.batched(bs), batch_size=None, num_workers=nw):
        pass
    phases[f"data only, clip_benchmark's wds reader: {n} images (also decodes mask.png)"] = t() - t0
    del batches
    with tempfile.TemporaryDirectory() as tmp:

        def extractor():
            return FeatureExtractor(
                model,
                transform,
                model_type="open_clip",
                model_name=spec["model"],
                pretrained=spec["checkpoint"],
                amp=amp,
                batch_size=bs,
                num_workers=nw,
                cache=FeatureCache(tmp),
                progress=False,
            )

        t0 = t()
        extractor().extract(ds, "wds/spurious_shapes", split)
        phases[f"extraction, cold (data + forward + cache write): {n} images"] = t() - t0
        phases["  -> forward + cache write (cold extraction - data only, ours)"] = (
            phases[phases_key(phases, "extraction, cold")] - phases[phases_key(phases, "data only, ours")]
        )
        t0 = t()
        ex = extractor()
        ex.extract(ds, "wds/spurious_shapes", split)
        phases["extraction, warm (fingerprint + cache read)"] = t() - t0
        assert not ex.extracted, "warm probe extracted"
    return {k: round(v, 3) for k, v in phases.items()}


def phases_key(phases: dict, prefix: str) -> str:
    return next(k for k in phases if k.startswith(prefix))


def run_probe(spec: dict, label: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_phase_probe", json.dumps(spec)]
    seconds, proc = run_timed(cmd, label=f"phase probe {label}")
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"process_seconds": round(seconds, 3), "phases": phases}


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--work_dir",
        default=None,
        help="where shards, checkpoints, caches and outputs go (default: a temp dir, removed at the end)",
    )
    p.add_argument("--keep_work_dir", action="store_true", help="keep the temporary work dir")
    p.add_argument("--train_size", type=int, default=2000)
    p.add_argument("--val_size", type=int, default=400)
    p.add_argument("--test_size", type=int, default=2000)
    p.add_argument(
        "--image_size", type=int, default=32, help="generated image side in pixels (the model's transform resizes)"
    )
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--split", default="test")
    p.add_argument(
        "--checkpoint",
        default=None,
        help=f"crp-tiny checkpoint (default: the shipped {SHIPPED_CHECKPOINT.name} if present, else a random one)",
    )
    p.add_argument(
        "--random_checkpoint", action="store_true", help="use a random-init crp-tiny saved into the work dir"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="autocast on for both tools (default: --no_amp for both)")
    p.add_argument("--with_vit", action="store_true", help="also benchmark ViT-S-32 (random init) on a smaller split")
    p.add_argument("--vit_model", default="ViT-S-32")
    p.add_argument("--vit_test_size", type=int, default=200)
    p.add_argument("--no_breakdown", action="store_true", help="skip the in-process phase breakdown")
    p.add_argument("--no_startup", action="store_true", help="skip the process start-up rows")
    p.add_argument("--output", default=str(REPO / "bench" / "results_eval.json"))
    p.add_argument("--_phase_probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._phase_probe:
        print(json.dumps(phase_probe(json.loads(args._phase_probe))))
        return 0
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="crp_bench_eval_")
        work = Path(tmp)
    log(f"work dir {work}")
    try:
        return _main(args, work, log, t_start)
    finally:
        if tmp and not args.keep_work_dir:
            shutil.rmtree(tmp, ignore_errors=True)


def _main(args, work: Path, log, t_start: float) -> int:
    info = machine_info()
    info["load_avg_start"] = load_avg()
    patch = numpy_breaks_clip_benchmark()
    (work / "clip_benchmark_shim.py").write_text(SHIM)
    log(
        f"numpy {info['numpy']}: plain clip_benchmark zero-shot {'CRASHES -> accuracy patched in the shim' if patch else 'works'}"
    )

    data = work / "data"
    gen = ensure_data(
        data,
        train=args.train_size,
        val=args.val_size,
        test=args.test_size,
        image_size=args.image_size,
        seed=args.data_seed,
    )
    log(f"shards: {gen}")

    if args.checkpoint:
        checkpoint, ckpt_kind = Path(args.checkpoint).resolve(), "given"
    elif SHIPPED_CHECKPOINT.is_file() and not args.random_checkpoint:
        checkpoint, ckpt_kind = SHIPPED_CHECKPOINT, "shipped"
    else:
        checkpoint, ckpt_kind = work / "crp-tiny_random.safetensors", "random-init"
        if not checkpoint.is_file():
            save_random_checkpoint(TINY, checkpoint, TINY_CONFIG)
    log(f"checkpoint ({ckpt_kind}): {checkpoint}")

    results: dict = {
        "script": "bench/bench_eval.py",
        "argv": sys.argv[1:],
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "numpy_breaks_plain_clip_benchmark": patch,
        "data": gen,
        "checkpoint": {"path": str(checkpoint), "kind": ckpt_kind},
        "suites": {},
    }
    suites = [
        Suite(
            "crp-tiny",
            model=TINY,
            checkpoint=checkpoint,
            data=data,
            work=work,
            args=args,
            patch_accuracy=patch,
            model_config=TINY_CONFIG,
        )
    ]
    if args.with_vit:
        vit_data = work / "data_vit"
        vit_gen = ensure_data(
            vit_data, train=8, val=8, test=args.vit_test_size, image_size=args.image_size, seed=args.data_seed
        )
        vit_ckpt = work / f"{args.vit_model}_random.safetensors"
        if not vit_ckpt.is_file():
            save_random_checkpoint(args.vit_model, vit_ckpt)
        results["data_vit"] = vit_gen
        suites.append(
            Suite(
                args.vit_model,
                model=args.vit_model,
                checkpoint=vit_ckpt,
                data=vit_data,
                work=work,
                args=args,
                patch_accuracy=patch,
                model_config=None,
            )
        )

    if not args.no_startup:
        results["startup"] = startup_rows(args.repeats, log)
    for suite in suites:
        results["suites"][suite.name] = run_suite(suite, args.repeats, log)
        if not args.no_breakdown:
            spec = {
                "model": suite.model,
                "checkpoint": str(suite.checkpoint),
                "data": str(suite.data),
                "model_config": str(TINY_CONFIG) if suite.model == TINY else None,
                "amp": args.amp,
                "batch_size": args.batch_size,
                "num_workers": args.num_workers,
                "split": args.split,
            }
            results["suites"][suite.name]["breakdown"] = run_probe(spec, suite.name)
            log(f"[{suite.name}] breakdown done")
    info["load_avg_end"] = load_avg()
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print_report(results, args)
    print(f"\nwrote {out}")
    ok = all(s["acc1_check"]["equal"] for s in results["suites"].values())
    return 0 if ok else 1


def print_report(results: dict, args) -> None:
    m = results["machine"]
    print(
        f"\nmachine: {m['cpu_count']} CPUs ({m.get('cpu_model', m['processor'])}), torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}, numpy {m['numpy']}, "
        f"load avg start {m['load_avg_start']} end {m['load_avg_end']}"
    )
    d = results["data"]["config"]
    print(
        f"data: spurious_shapes train/val/test {d['train_size']}/{d['val_size']}/{d['test_size']} at "
        f"{d['image_size']}px, eval split {args.split!r}; checkpoint {results['checkpoint']['kind']}; "
        f"batch {args.batch_size}, workers {args.num_workers}, amp {'on' if args.amp else 'off (--no_amp)'}; "
        f"median of {args.repeats}"
    )
    rows = []
    for name, s in results["suites"].items():
        c = s["commands"]
        a_wall, a_cpu = c["a"]["median_s"], c["a"]["median_cpu_s"]
        labels = {
            "a": f"{name} a: clip_benchmark eval (baseline)",
            "b": f"{name} b: clip_benchmark_robust eval, cold cache",
            "c": f"{name} c: clip_benchmark_robust eval, warm cache",
        }
        for w, label in labels.items():
            wall, cpu = c[w]["median_s"], c[w]["median_cpu_s"]
            rows.append((label, wall, f"{wall / a_wall:.2f}", cpu, f"{cpu / a_cpu:.2f}", c[w]["seconds"]))
    for name, row in results.get("startup", {}).items():
        rows.append((f"startup: {name}", row["median_s"], "-", row["median_cpu_s"], "-", row["seconds"]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'command':<{width}}  {'median s':>8}  {'vs a':>5}  {'cpu s':>6}  {'vs a':>5}  all runs, wall s")
    print("-" * (width + 57))
    for label, med, ratio, cpu, cpu_ratio, runs in rows:
        print(f"{label:<{width}}  {med:8.2f}  {ratio:>5}  {cpu:6.2f}  {cpu_ratio:>5}  {runs}")
    print(
        "(median s: wall clock; cpu s: user+sys CPU seconds of the process, median; vs a: ratio of medians to the baseline)"
    )
    for name, s in results["suites"].items():
        print(f"{name} baseline runs via: {s['baseline_runs_via']}")

    for name, s in results["suites"].items():
        print(f"\n{name} command lines ($WORK = the work dir):")
        for w in "abc":
            print(f"  {w}: {s['commands'][w]['display']}")
        chk = s["acc1_check"]
        status = "OK" if chk["equal"] else "MISMATCH"
        print(
            f"{name} acc1 check: {status}  a={chk['acc1_a']} b={chk['acc1_b']} c={chk['acc1_c']}; "
            f"warm runs extracted nothing: {chk['warm_runs_extracted_nothing']}, cold runs extracted: {chk['cold_runs_extracted']}"
        )
        res_b = s["commands"]["b"]["results"][0]
        print(f"{name} (b) wrote {res_b['n_metrics']} metrics, e.g. {res_b['group_metric_keys'][:4]}")
        if "breakdown" in s:
            bd = s["breakdown"]
            print(f"{name} phase breakdown (one fresh process, {bd['process_seconds']:.2f} s wall in all):")
            for phase, sec in bd["phases"].items():
                print(f"    {sec:7.3f} s  {phase}")
    print(f"\ntotal benchmark time {results['total_seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
