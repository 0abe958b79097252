"""On a CPU the default is fp32 (AMP only with --amp); the results file records which."""

from __future__ import annotations

import json

import pytest

from clip_robust_plugins.cli import resolve_amp


@pytest.mark.parametrize(("flags", "amp"), [((), False), (("--amp",), True), (("--no_amp",), False)])
def test_the_cpu_default_is_fp32_and_recorded(run_cli, shapes_flags, tmp_path, flags, amp):
    out = tmp_path / "r.json"
    rc, _, err = run_cli("eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--quiet",
                         "--num_workers", "0", "--no_feature_cache", "--output", out, *flags)
    assert rc == 0, err
    assert json.loads(out.read_text())["robust"]["amp"] is amp


@pytest.mark.parametrize(("given", "device", "expected"),
                         [(None, "cpu", False), (None, "cuda", True), (None, "cuda:1", True),
                          (True, "cpu", True), (False, "cuda", False)])
def test_resolve_amp(given, device, expected):
    import argparse

    args = argparse.Namespace(amp=given)
    resolve_amp(args, device)
    assert args.amp is expected
