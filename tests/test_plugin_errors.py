"""Errors never become tracebacks: an exception raised by a third-party plugin's code in any
stage (create, check, fit, predict, load_state_dict, a dataset reader, a metric) ends the run
with one line naming the plugin, the method or dataset and the stage; exit 2; nothing written.
``--trace_plugins`` adds the traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_robust_plugins import DatasetSpec, MetricSpec, Mitigation, MitigationSpec, Needs, hookimpl

#: (stage, exception type) the test method raises; set per test
FAIL: dict = {}


def _maybe_fail(stage: str) -> None:
    if FAIL.get("stage") == stage:
        raise FAIL["type"](f"boom in {stage}")


class Fragile(Mitigation):
    """Zero-shot logits with a small fitted state, raising in the stage the test names."""

    def __init__(self):
        _maybe_fail("create")

    def check(self, ctx):
        _maybe_fail("check")

    def fit(self, ctx):
        _maybe_fail("fit")

    def predict(self, ctx, split):
        _maybe_fail("predict")
        return ctx.zeroshot_logits(ctx.features(split).features)

    def state_dict(self):
        import torch

        return {"w": torch.ones(2)}

    def load_state_dict(self, state):
        _maybe_fail("load_state_dict")


def _fragile_metric(preds):
    _maybe_fail("metric")
    return {"fragile_metric": 1.0}


def _fragile_dataset(request):
    _maybe_fail("dataset")
    import dataclasses

    from clip_robust_plugins.argtypes import config_from_options
    from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, load_spurious_shapes

    # a wrapper of robust/spurious_shapes reads that dataset's own --shapes_* flags
    config = config_from_options(ShapesConfig, "shapes_", request.options)
    dataset = load_spurious_shapes(dataclasses.replace(request, config=config))
    for method in ("splits", "fingerprint"):  # read before the dataset is used / while its features are read
        original = getattr(dataset, method)

        def fragile(*args, _original=original, _method=method):
            _maybe_fail(f"dataset.{_method}")
            return _original(*args)

        setattr(dataset, method, fragile)
    return dataset


class FragilePlugin:
    @hookimpl
    def register_mitigations(self, register):
        register(MitigationSpec("fragile", create=lambda options: Fragile(), needs=Needs()))

    @hookimpl
    def register_metrics(self, register):
        register(MetricSpec("fragile_metric", _fragile_metric))

    @hookimpl
    def register_datasets(self, register):
        register(DatasetSpec("fragile_shapes", _fragile_dataset))


@pytest.fixture()
def fragile(crp_plugin_manager, monkeypatch, run_cli, shapes_flags, tmp_path_factory):
    """Run eval with the fragile plugin; features cached across this module's tests."""
    from clip_robust_plugins import cli

    crp_plugin_manager.register(FragilePlugin(), name="fragile_plugin")
    monkeypatch.setattr(cli, "build_plugin_manager", lambda *a, **k: crp_plugin_manager.pm)
    cache = tmp_path_factory.getbasetemp() / "fragile_features"

    def run(stage: str | None, exc_type: type = ValueError, *extra: str, out: Path) -> tuple[int, str]:
        monkeypatch.setitem(FAIL, "stage", stage)
        monkeypatch.setitem(FAIL, "type", exc_type)
        rc, _, err = run_cli(
            "eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--quiet",
            "--num_workers", "0", "--feature_cache", cache, "--save_predictions", "--output", out, *extra,
        )
        return rc, err

    return run


def assert_one_line(rc: int, err: str, out: Path, *needles: str) -> str:
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("clip_benchmark_robust: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written
    return lines[0]


@pytest.mark.parametrize("exc_type", [ValueError, RuntimeError, KeyError])
@pytest.mark.parametrize("stage", ["create", "check", "fit", "predict"])
def test_a_method_raising_in_any_stage_is_one_line(fragile, tmp_path, stage, exc_type):
    out = tmp_path / "out" / "r.json"
    rc, err = fragile(stage, exc_type, "--mitigation", "fragile", out=out)
    line = assert_one_line(rc, err, out, "mitigation 'fragile'", "(plugin 'fragile_plugin')", f"failed in {stage}:",
                           exc_type.__name__, f"boom in {stage}")
    assert "Traceback" not in line


@pytest.mark.parametrize("exc_type", [ValueError, RuntimeError, KeyError])
def test_a_state_that_fails_to_load_is_one_line(fragile, tmp_path, exc_type):
    first = tmp_path / "first" / "r.json"
    rc, err = fragile(None, ValueError, "--mitigation", "fragile", "--save_mitigation_state", out=first)
    assert rc == 0, err
    state = first.parent / "r_state_fragile.safetensors"
    assert state.is_file()
    out = tmp_path / "out" / "r.json"
    rc, err = fragile("load_state_dict", exc_type, "--mitigation", "fragile", "--mitigation_state", str(state), out=out)
    assert_one_line(rc, err, out, "mitigation 'fragile' (plugin 'fragile_plugin') failed in load_state_dict:",
                    exc_type.__name__)


@pytest.mark.parametrize("exc_type", [ValueError, RuntimeError, KeyError])
def test_a_metric_raising_is_one_line(fragile, tmp_path, exc_type):
    out = tmp_path / "out" / "r.json"
    rc, err = fragile("metric", exc_type, out=out)
    assert_one_line(rc, err, out, "metric 'fragile_metric' (plugin 'fragile_plugin')", "failed in score",
                    "'zeroshot'", exc_type.__name__, "boom in metric")


@pytest.mark.parametrize("exc_type", [ValueError, RuntimeError, KeyError])
def test_a_dataset_reader_raising_is_one_line(fragile, tmp_path, exc_type, shapes_root):
    out = tmp_path / "out" / "r.json"
    rc, err = fragile("dataset", exc_type, "--dataset", "robust/fragile_shapes", out=out)
    assert_one_line(rc, err, out, "dataset 'robust/fragile_shapes' (plugin 'fragile_plugin') failed in load:",
                    exc_type.__name__, "boom in dataset")


def test_trace_plugins_adds_the_traceback(fragile, tmp_path):
    out = tmp_path / "out" / "r.json"
    rc, err = fragile("fit", RuntimeError, "--mitigation", "fragile", "--trace_plugins", out=out)
    assert rc == 2
    assert "Traceback (most recent call last)" in err and "boom in fit" in err
    assert err.strip().splitlines()[-1].startswith("clip_benchmark_robust: error: mitigation 'fragile'")
    assert not out.exists()


def test_the_same_plugin_runs_when_nothing_fails(fragile, tmp_path):
    out = tmp_path / "out" / "r.json"
    rc, err = fragile(None, ValueError, "--mitigation", "fragile", out=out)
    assert rc == 0, err
    import json

    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["fragile/fragile_metric"] == 1.0
    assert metrics["fragile/acc1"] == metrics["zeroshot/acc1"]  # same logits as zero-shot


@pytest.mark.parametrize(("method", "stage"), [("splits", "splits"), ("fingerprint", "extract (split 'test')")])
def test_a_dataset_failing_later_names_the_stage(fragile, tmp_path, method, stage):
    out = tmp_path / "out" / "r.json"
    rc, err = fragile(f"dataset.{method}", RuntimeError, "--dataset", "robust/fragile_shapes", out=out)
    assert_one_line(rc, err, out, f"dataset 'robust/fragile_shapes' (plugin 'fragile_plugin') failed in {stage}:",
                    "RuntimeError", f"boom in dataset.{method}")
