"""Data-parallel extraction: ordered shares, workers, and torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_robust_plugins.datasets.base import RobustDataset
from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate
from clip_robust_plugins.datasets.wds import GroupedShards
from clip_robust_plugins.features import FeatureCache, FeatureExtractor
from clip_robust_plugins.groups import two_field_schema

SIZES = dict(train_size=64, val_size=40, test_size=40)


@pytest.fixture(scope="module")
def multi_shard_root(tmp_path_factory) -> Path:
    """spurious_shapes with 7-sample shards: 6 shards per 40-sample split."""
    root = tmp_path_factory.mktemp("multi") / "data"
    generate(root, ShapesConfig(**SIZES), progress=False, shard_size=7)
    return root


def _keys(data) -> list[tuple[tuple[int, int], str]]:
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=0)
    return [(tuple(order.tolist()), key) for order, key, _, _ in loader]


def test_grouped_shard_parts_cover_the_split_once_in_order(multi_shard_root):
    ds = GroupedShards(multi_shard_root)
    whole = [key for key, _, _ in ds.samples("test", None)]
    assert len(ds.shard_paths("test")) == 6 and len(whole) == 40
    parts = [_keys(ds.ordered_samples("test", None, rank, 4)) for rank in range(4)]
    # rank r reads shards r, r + 4: its order keys name exactly those shards
    assert {o[0] for o, _ in parts[1]} == {1, 5}
    merged = sorted(item for part in parts for item in part)
    assert [key for _, key in merged] == whole


def test_more_ranks_than_shards_gives_empty_shares(shapes_root):
    ds = GroupedShards(shapes_root)
    assert len(ds.shard_paths("test")) == 1
    assert _keys(ds.ordered_samples("test", None, 2, 3)) == []
    assert len(_keys(ds.ordered_samples("test", None, 0, 3))) == 32


class _ListDataset(RobustDataset):
    """A reader whose samples() is map-style or iterable, to exercise the default ordering."""

    def __init__(self, iterable: bool):
        self.schema = two_field_schema(["a", "b"], ["u", "v"])
        self.templates, self.classnames, self.iterable = ["{c}"], ["a", "b"], iterable
        self.items = [(f"s{i:02d}", torch.full((1,), float(i)), torch.tensor([i % 2, (i // 2) % 2])) for i in range(23)]

    def splits(self):
        return ("test",)

    def fingerprint(self, split):
        return "x"

    def samples(self, split, transform):
        if not self.iterable:
            return self.items
        items = self.items

        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(items)

        return Stream()


@pytest.mark.parametrize("iterable", [False, True])
def test_default_ordered_samples_partition_any_reader(iterable):
    ds = _ListDataset(iterable)
    parts = [_keys(ds.ordered_samples("test", None, rank, 3)) for rank in range(3)]
    assert sorted(len(p) for p in parts) == [7, 8, 8]
    assert [key for _, key in sorted(i for p in parts for i in p)] == [k for k, _, _ in ds.items]


def test_iterable_reader_is_not_duplicated_across_dataloader_workers():
    ds = _ListDataset(iterable=True)
    loader = torch.utils.data.DataLoader(ds.ordered_samples("test", None, 0, 1), batch_size=None, num_workers=2)
    keys = [key for _, key, _, _ in loader]
    assert sorted(keys) == [k for k, _, _ in ds.items]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_sample_order_does_not_depend_on_dataloader_workers(multi_shard_root, crp_tiny_model):
    model, transform, _ = crp_tiny_model
    ds = GroupedShards(multi_shard_root)
    results = []
    for workers in (0, 3, 8):  # 8 workers > 6 shards
        extractor = FeatureExtractor(
            model, transform, model_type="open_clip", model_name="crp-tiny", pretrained="spurious_shapes",
            amp=False, batch_size=5, num_workers=workers, cache=FeatureCache(None), progress=False,
        )
        results.append(extractor.extract(ds, "robust/spurious_shapes", "test")["image"])
    single = [key for key, _, _ in ds.samples("test", None)]
    for fs in results:
        assert list(fs.keys) == single
        assert torch.allclose(fs.features, results[0].features, atol=1e-6)
        assert torch.equal(fs.fields, results[0].fields)


def _console_script() -> str:
    found = shutil.which("clip_benchmark_robust") or str(Path(sys.executable).parent / "clip_benchmark_robust")
    assert Path(found).exists(), "the clip_benchmark_robust console script is not installed"
    return found


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(multi_shard_root, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU) gives the single-process result, metric for metric."""
    flags = [
        "eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(multi_shard_root),
        "--shapes_train_size", "64", "--shapes_val_size", "40", "--shapes_test_size", "40",
        "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp", "--mitigation", "dfr",
        "--batch_size", "8", "--save_predictions", "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    outputs = {}
    for name, launcher, workers in (
        ("single", [_console_script()], "0"),
        ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "--no-python", _console_script()], "2"),
    ):
        out = tmp_path / f"{name}.json"
        cmd = [*launcher, *flags, "--num_workers", workers, "--output", str(out),
               "--feature_cache", str(tmp_path / f"features_{name}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = json.loads(out.read_text())
        outputs[name + "_csv"] = (tmp_path / f"{name}_predictions.csv").read_text()
    assert outputs["torchrun"]["robust"]["processes"] == 2
    assert outputs["single"]["robust"]["processes"] == 1
    assert outputs["torchrun"]["metrics"] == outputs["single"]["metrics"]
    assert outputs["torchrun_csv"] == outputs["single_csv"]
    # exactly one results file: the worker rank wrote nothing
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["single.json", "torchrun.json"]


def _visual_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


@pytest.mark.slow
def test_torchrun_fine_tuning_equals_one_process_with_the_same_global_batch(shapes_root, tmp_path):
    """``clip_ft`` under ``torchrun --nproc_per_node 2`` (gloo): each rank encodes half of every global batch,
    gradients are averaged; the fine-tuned tower equals one process's to float tolerance, predictions exactly.
    A single process with another batch size is the control that the comparison can fail."""
    flags = [
        "eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(shapes_root),
        "--shapes_train_size", "64", "--shapes_val_size", "32", "--shapes_test_size", "32",
        "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp", "--num_workers", "0", "--quiet",
        "--mitigation", "clip_ft", "--ravl_lr", "1e-4", "--save_mitigation_state", "--save_predictions",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    runs = {"single": ([], "16"), "torchrun": (torchrun, "16"), "control": ([], "8")}
    for name, (launcher, batch) in runs.items():
        cmd = [*launcher, _console_script(), *flags, "--ravl_batch_size", batch, "--output", str(tmp_path / f"{name}.json"),
               "--feature_cache", str(tmp_path / f"features_{name}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two, control = (_visual_state(tmp_path / f"{n}_state_clip_ft.safetensors") for n in runs)
    assert set(one) == set(two)
    diff = torch.cat([(one[k] - two[k]).abs().reshape(-1) for k in one])
    off = torch.cat([(one[k] - control[k]).abs().reshape(-1) for k in one])
    # AdamW divides by sqrt(v): parameters with gradients near zero amplify summation-order noise, so a
    # handful may differ by a few 1e-5; a different global batch moves most of them
    assert float(diff.max()) < 2e-4 and float((diff > 1e-6).float().mean()) < 0.01
    assert float((off > 1e-6).float().mean()) > 0.5
    results = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("single", "torchrun")}
    hp = results["torchrun"]["robust"]["methods"]["clip_ft"]["hyperparameters"]
    assert hp["processes"] == 2 and hp["train_images_seen"] == 64
    one_m, two_m = results["single"]["metrics"], results["torchrun"]["metrics"]
    assert set(one_m) == set(two_m)
    for key, value in one_m.items():  # accuracies equal; probability-based scores (ECE) to float tolerance
        assert two_m[key] == value or (isinstance(value, float) and abs(two_m[key] - value) < 1e-6), key
    assert (tmp_path / "torchrun_predictions.csv").read_text() == (tmp_path / "single_predictions.csv").read_text()
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["control.json", "single.json", "torchrun.json"]
