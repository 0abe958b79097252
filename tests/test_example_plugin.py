"""The third-party example plugin (``examples/crp-example-plugin``), pip-installed and used for real.

The package is installed once per module with pip (``--no-deps --no-build-isolation``)
into a temporary site directory, from a copy of its source (so no build files land in
the repository).  Subprocesses get that directory on ``PYTHONPATH``, in-process tests on
``sys.path``: the installed ``*.dist-info`` is what entry-point discovery reads, exactly
as for a package in site-packages, and the environment outside the test run is left
unchanged.  A failing install fails the tests; nothing is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_robust_plugins import DatasetRequest, Predictions, plugins
from clip_robust_plugins.datasets.base import DatasetError
from clip_robust_plugins.datasets.wds import GroupedShards
from clip_robust_plugins.groups import two_field_schema
from clip_robust_plugins.pytest_plugin import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SRC = REPO / "examples" / "crp-example-plugin"
EXPECTED_HOOKS = ["register_datasets", "register_metrics", "register_mitigations"]
SMALL_SHAPES = ["--shapes_train_size", "48", "--shapes_val_size", "24", "--shapes_test_size", "24"]


# ------------------------------------------------------------------------------ set-up
@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """A site directory holding the pip-installed example plugin (wheel contents + dist-info)."""
    tmp = tmp_path_factory.mktemp("example_plugin")
    src = tmp / "src"
    shutil.copytree(EXAMPLE_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input", "-q",
         "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip install of {EXAMPLE_SRC} failed:\n{proc.stdout}\n{proc.stderr}"
    dist_infos = list(site.glob("crp_example_plugin-0.1.0.dist-info"))
    assert dist_infos, f"no dist-info in {sorted(p.name for p in site.iterdir())}"
    assert "example = crp_example_plugin" in (dist_infos[0] / "entry_points.txt").read_text()
    return site


@pytest.fixture
def example_on_path(example_site, monkeypatch):
    """The installed example importable (and discoverable) in this process; returns its module."""
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.delenv(plugins.ENV_ALLOWLIST, raising=False)
    for name in [m for m in sys.modules if m == "crp_example_plugin" or m.startswith("crp_example_plugin.")]:
        monkeypatch.delitem(sys.modules, name)
    import crp_example_plugin

    assert Path(crp_example_plugin.__file__).is_relative_to(example_site)  # the installed copy, not the source
    return crp_example_plugin


def cli_command() -> list[str]:
    """The ``clip_benchmark_robust`` console script of this interpreter (or ``python -m`` its module)."""
    script = Path(sys.executable).parent / "clip_benchmark_robust"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "clip_robust_plugins.cli"]


def subprocess_env(*paths: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (plugins.ENV_ALLOWLIST, plugins.ENV_TRACE)}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


# ------------------------------------------------------------- discovery (subprocess)
def test_installed_example_is_discovered_with_version_hooks_and_records(example_site, tmp_path):
    """Entry-point discovery in a fresh ``clip_benchmark_robust plugins``, beside a broken plugin."""
    (tmp_path / "crp_test_broken_plugin.py").write_text("raise RuntimeError('broken on purpose')\n")
    proc = subprocess.run(
        [*cli_command(), "plugins", "--json", "--plugin", "crp_test_broken_plugin"],
        capture_output=True, text=True, timeout=300, env=subprocess_env(example_site, tmp_path), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    example = rows["example"]  # the entry-point name
    assert example["version"] == "0.1.0"
    assert example["hooks"] == EXPECTED_HOOKS
    assert example["registers"] == {
        "datasets": ["robust/example_photos", "robust/example_stripes"],
        "metrics": ["example_group_acc_std"],
        "mitigations": ["example_prior_shift"],
        "model_loaders": [],
        "checkpoints": [],
        "view_providers": [],
        "region_proposers": [],
        "commands": [],
    }
    assert set(plugins.BUILTIN_PLUGINS) <= set(rows)  # built-ins load beside it
    # the broken --plugin module: one warning naming it, and everything else still works
    assert "crp_test_broken_plugin" not in rows
    assert proc.stderr.count("PluginImportWarning") == 1, proc.stderr
    assert "'crp_test_broken_plugin' failed to import" in proc.stderr and "broken on purpose" in proc.stderr


# ------------------------------------------------------------------ eval (subprocess)
@pytest.fixture(scope="module")
def example_eval(example_site, tiny_pretrained, tmp_path_factory) -> dict[str, dict]:
    """One ``clip_benchmark_robust eval`` of example_prior_shift on both datasets; results by dataset."""
    out = tmp_path_factory.mktemp("example_eval")
    proc = subprocess.run(
        [*cli_command(), "eval", "--dataset", "robust/example_stripes", "robust/spurious_shapes",
         "--dataset_root", str(out / "data" / "{dataset_cleaned}"), "--stripes_size", "36", *SMALL_SHAPES,
         "--model", TINY_MODEL, "--pretrained", tiny_pretrained, "--mitigation", "example_prior_shift",
         "--feature_cache", str(out / "features"), "--output", str(out / "{dataset}.json"),
         "--num_workers", "0", "--no_amp", "--batch_size", "64"],
        capture_output=True, text=True, timeout=300, env=subprocess_env(example_site), cwd=out,
    )
    assert proc.returncode == 0, proc.stderr
    assert "example_prior_shift" in proc.stdout  # the per-group table has its column
    return {name: json.loads((out / f"robust_{name}.json").read_text()) for name in ("example_stripes", "spurious_shapes")}


@pytest.mark.parametrize(
    "dataset,groups",
    [
        ("example_stripes", [f"y:{y}_a:{a}" for y in ("horizontal", "vertical", "diagonal") for a in ("warm", "cool")]),
        ("spurious_shapes", [f"y:{y}_a:{a}" for y in ("square", "diamond") for a in ("land", "water")]),
    ],
)
def test_eval_runs_the_example_mitigation_and_metric(example_eval, dataset, groups):
    results = example_eval[dataset]
    assert results["dataset"] == f"robust/{dataset}" and results["task"] == "zeroshot_classification"
    metrics = results["metrics"]
    for method in ("zeroshot", "example_prior_shift"):
        for key in ("acc", "worst_group_acc", "acc_group_mean", "balanced_acc", "group_acc_std"):
            assert f"{method}/{key}" in metrics
        accs = [metrics[f"{method}/group_acc/{g}"] for g in groups]
        # the plugin's metric is computed for every method and agrees with the built-in per-group keys
        assert metrics[f"{method}/group_acc_std"] == pytest.approx(float(np.std(accs)), abs=1e-12)
    info = results["robust"]["methods"]["example_prior_shift"]
    assert info["plugin"] == "example"
    assert info["needs"] == {"fit_splits": ["val"], "labels": ["class"], "feature_kinds": ["image"], "live_model": False}
    hyper = info["hyperparameters"]
    assert hyper["fit_split"] == "val" and len(hyper["bias"]) == len(groups) // 2
    assert hyper["target_class_prior"] == pytest.approx([2 / len(groups)] * (len(groups) // 2), abs=1e-6)
    assert results["robust"]["groups"] == groups


# ------------------------------------------------------- in-process, with the fixtures
def test_example_with_the_pytest_plugin_fixtures(example_on_path, crp_plugin_manager, crp_eval, tiny_pretrained):
    name = crp_plugin_manager.register(example_on_path)
    assert crp_plugin_manager.registry.owner("datasets", "example_stripes") == name == "crp_example_plugin"
    # the example's own dataset, with its own flag
    stripes = crp_eval("--stripes_size", "18", dataset="robust/example_stripes", mitigation=["example_prior_shift"],
                       pretrained=tiny_pretrained)
    assert stripes["metrics"]["example_prior_shift/group_count/y:diagonal_a:cool"] == 3.0  # 18 / 6 groups
    assert "zeroshot/group_acc_std" in stripes["metrics"]
    # a built-in dataset (crp_tiny_shards), and the example mitigation beside a built-in one
    shapes = crp_eval(mitigation=["example_prior_shift", "erm_head"], pretrained=tiny_pretrained)
    assert {"example_prior_shift/group_acc_std", "erm_head/group_acc_std"} <= set(shapes["metrics"])


def test_allow_list_selects_the_example_by_entry_point_name(example_on_path, tmp_path, monkeypatch):
    # a second installed plugin, so "only that one" means something
    other = tmp_path / "site"
    (other / "crp_other-1.0.dist-info").mkdir(parents=True)
    (other / "crp_other-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: crp_other\nVersion: 1.0\n")
    (other / "crp_other-1.0.dist-info" / "entry_points.txt").write_text("[clip_robust_plugins]\nother = crp_other\n")
    (other / "crp_other.py").write_text("")
    monkeypatch.syspath_prepend(str(other))

    def loaded() -> set[str]:
        pm = plugins.build_plugin_manager()
        return {pm.get_name(p) for p in pm.get_plugins()} - set(plugins.BUILTIN_PLUGINS)

    assert {"example", "other"} <= loaded()
    monkeypatch.setenv(plugins.ENV_ALLOWLIST, "example")
    assert loaded() == {"example"}
    monkeypatch.setenv(plugins.ENV_ALLOWLIST, "")
    assert loaded() == set()


# ----------------------------------------------------------------- the pieces, directly
def test_stripes_dataset_generates_reads_back_and_checks_its_root(example_on_path, tmp_path):
    from crp_example_plugin import stripes

    request = DatasetRequest(root=str(tmp_path / "a"), config=stripes.StripesConfig(size=12))
    ds = stripes.load(request)
    assert isinstance(ds, GroupedShards) and ds.splits() == ("test", "train", "val")
    assert ds.classnames == ["horizontal", "vertical", "diagonal"]
    assert all("{c}" in t for t in ds.templates)
    assert list(ds.schema.counts("val")) == [2] * 6 and list(ds.schema.counts("test")) == [2] * 6
    train = ds.schema.counts("train")
    assert train.sum() == 12 and list(train) == [4, 0, 0, 4, 4, 0]  # 90 % of 4 rounds to all 4
    items = list(ds.samples("val", None))
    assert len(items) == 12 and items[0][1].size == (32, 32)
    assert sorted(ds.schema.group_ids(np.stack([f.numpy() for _, _, f in items]))) == sorted(list(range(6)) * 2)
    # deterministic: a second root holds byte-identical shards
    again = stripes.load(DatasetRequest(root=str(tmp_path / "b"), config=stripes.StripesConfig(size=12)))
    for split in ds.splits():
        assert (ds.root / split / "0.tar").read_bytes() == (again.root / split / "0.tar").read_bytes()
    # reopening is free; another size is refused (naming the flag), as is a foreign directory
    mtime = (ds.root / "groups.json").stat().st_mtime_ns
    stripes.load(request)
    assert (ds.root / "groups.json").stat().st_mtime_ns == mtime
    with pytest.raises(DatasetError, match=r"size=12 \(requested 24\).*--stripes_\*"):
        stripes.load(DatasetRequest(root=str(tmp_path / "a"), config=stripes.StripesConfig(size=24)))
    bigger = stripes.load(DatasetRequest(root=str(tmp_path / "d"), config=stripes.StripesConfig(size=24)))
    assert bigger.schema.counts("val").sum() == 24
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="refusing to generate"):
        stripes.load(DatasetRequest(root=str(tmp_path / "foreign"), config=stripes.StripesConfig(size=12)))
    with pytest.raises(DatasetError, match="at least 6"):
        stripes.StripesConfig(size=5)


def test_group_acc_std_metric(example_on_path):
    schema = two_field_schema(["c0", "c1"], ["a0", "a1"])
    # groups (y, a): (0,0) 2/2 right, (0,1) 0/2 right, (1,0) 1/2 right, (1,1) empty
    fields = np.array([[0, 0], [0, 0], [0, 1], [0, 1], [1, 0], [1, 0]])
    pred = np.array([0, 0, 1, 1, 1, 0])
    p = Predictions("m", "test", tuple("abcdef"), pred, fields, schema)
    out = example_on_path.group_acc_std(p)
    assert out == {"group_acc_std": pytest.approx(np.std([1.0, 0.0, 0.5]))}
    empty = Predictions("m", "test", (), np.zeros(0, int), np.zeros((0, 2), int), schema)
    assert math.isnan(example_on_path.group_acc_std(empty)["group_acc_std"])


class StubContext:
    """Just what the mitigation reads from a RunContext: features, class labels and the zero-shot head.

    The stub's "features" are zero-shot logits themselves: its head is the identity / 100,
    so ``100 * x @ head`` is ``x``.
    """

    eval_split = "test"

    def __init__(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
        self._logits, self._labels = logits, labels
        self.n_classes = next(iter(logits.values())).shape[1]
        self.classnames = [f"c{i}" for i in range(self.n_classes)]

    def features(self, split, kind="image"):
        return argparse.Namespace(features=self._logits[split], y=self._labels[split])

    def zeroshot_head(self):
        return torch.eye(self.n_classes) / 100.0


def test_prior_shift_matches_predicted_class_distribution_to_val_labels(example_on_path):
    from crp_example_plugin.prior_shift import SPEC, PriorShift, PriorShiftConfig

    from clip_robust_plugins import LinearHead

    assert issubclass(PriorShift, LinearHead)
    assert SPEC.needs.fit_splits == ("val",) and SPEC.needs.labels == frozenset({"class"})
    assert SPEC.options is PriorShiftConfig and SPEC.option_prefix == "example_prior_shift_"
    gen = torch.Generator().manual_seed(0)
    # a zero-shot head biased towards class 0, on val labels distributed 20 / 30 / 50 %
    val = torch.randn(200, 3, generator=gen) * 3 + torch.tensor([4.0, 0.0, -2.0])
    labels = torch.tensor([0] * 40 + [1] * 60 + [2] * 100)
    ctx = StubContext({"val": val, "test": val[:17]}, {"val": labels, "test": labels[:17]})
    method = SPEC.create(PriorShiftConfig())
    with pytest.raises(RuntimeError, match="before fit"):
        method.predict(ctx, "test")
    method.fit(ctx)
    bias = method.intercept
    q = torch.softmax(val.double() + bias, dim=1).mean(0)
    assert q.tolist() == pytest.approx([0.2, 0.3, 0.5], abs=1e-3)
    assert torch.softmax(val, dim=1).mean(0)[0] > 0.6  # it really moved
    assert abs(float(bias.sum())) < 1e-9
    # the fitted state round-trips, and predictions are zero-shot logits plus the bias
    state = method.state_dict()
    assert set(state) == {"coef", "intercept"}
    assert torch.allclose(state["coef"], torch.eye(3, dtype=torch.float64))  # 100 x the stub's head
    restored = PriorShift()
    restored.load_state_dict(state)
    assert torch.equal(restored.predict(ctx, "test"), method.predict(ctx, "test"))
    assert torch.allclose(method.predict(ctx, "test"), val[:17] + bias.float(), atol=1e-5)
    hyper = json.loads(json.dumps(method.hyperparameters()))
    assert hyper["fit_split"] == "val" and hyper["reg"] == 1e-4 and hyper["bias"] == pytest.approx(bias.tolist(), abs=1e-4)
    assert hyper["labels_read"] == {"val": ["class"]}
    with pytest.raises(ValueError, match="expected"):
        restored.load_state_dict({"weights": torch.zeros(3)})
