"""Fail before working: what a run can check up front fails before the model is built or a
feature is extracted (nothing lands in the feature cache), with one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def attempt(run_cli, shapes_flags, tmp_path):
    def run(*extra: str, output: Path | None = None) -> tuple[int, str, Path]:
        cache = tmp_path / "cache"
        rc, _, err = run_cli(
            "eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp", "--quiet",
            "--num_workers", "0", "--feature_cache", cache, "--output", output or tmp_path / "out" / "r.json", *extra,
        )
        return rc, err, cache

    return run


def assert_failed_before_work(rc: int, err: str, cache: Path, *needles: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0]
    assert not cache.exists() or not any(cache.iterdir())  # nothing was extracted


def test_an_unwritable_output_fails_before_extraction(attempt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, err, cache = attempt(output=blocker / "results.json")
    assert_failed_before_work(rc, err, cache, "cannot write here", "a_file")


def test_a_missing_state_file_fails_before_extraction(attempt, tmp_path):
    rc, err, cache = attempt("--mitigation", "dfr", "--mitigation_state", str(tmp_path / "nope.safetensors"))
    assert_failed_before_work(rc, err, cache, "nope.safetensors")


def test_an_unknown_mitigation_fails_before_extraction(attempt):
    rc, err, cache = attempt("--mitigation", "no_such_method")
    assert_failed_before_work(rc, err, cache, "no_such_method")


def test_an_unknown_model_type_fails_before_extraction(attempt, tmp_path):
    with pytest.raises(SystemExit) as exc:  # argparse's own choices check: the registered model types
        attempt("--model_type", "no_such_type")
    assert exc.value.code == 2 and not (tmp_path / "cache").exists()
