"""bench/gpu_check.py's reduced (CPU) mode: every row of the GPU table runs and is finite.

No timing thresholds: the numbers of a shared CPU say nothing; what is tested is that each
check runs end to end (extraction at each worker count, AMP agreement, SEraser, RaVL, DDP).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
ROWS = ["extraction", "extraction", "AMP vs fp32: predictions equal", "AMP vs fp32: max abs logit diff",
        "SEraser batched tuning", "RaVL fine-tuning step", "DDP step (world size 1)"]


def test_reduced_mode_prints_every_row(tmp_path):
    out = tmp_path / "table.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--reduced", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert [r["check"] for r in rows] == ROWS
    assert saved["mode"]["name"] == "reduced" and saved["mode"]["device"] == "cpu"
    extraction = [r for r in rows if r["check"] == "extraction"]
    assert [r["setting"].split()[0] for r in extraction] == ["0", "1"]  # workers 0 and 1
    for r in rows:
        assert math.isfinite(r["value"]) and r["value"] >= 0, r
    for r in extraction:
        assert r["value"] > 0 and r["forward"] > 0
        assert r["ratio"] == pytest.approx(r["value"] / r["forward"])
    equal = next(r for r in rows if r["check"] == "AMP vs fp32: predictions equal")
    assert 0.0 <= equal["value"] <= 1.0
    # the printed table is the saved one: one line per row, values as saved
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == len(rows)
    for line, r in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["check"] and float(cells[2]) == pytest.approx(r["value"], rel=1e-3)
    assert not list(tmp_path.glob("crp_gpu_check_*"))  # its temp dir is gone, nothing written beside


def test_failure_is_one_line_and_non_zero(monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))

    def broken(mode):
        raise RuntimeError("no such model\nsecond line")

    monkeypatch.setattr(gpu_check, "build_model", broken)
    assert gpu_check.main(["--reduced"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "gpu_check: error: setup (crp-tiny on cpu): RuntimeError: no such model second line"
    assert not any(line.startswith("gpu_check: error") for line in err[:-1])
