"""Many seeds in one process: ``--seed 0 1`` extracts once and writes one results file per seed,
whose numbers equal separate one-seed runs'."""

from __future__ import annotations

import json

import pytest


@pytest.fixture()
def seeds_eval(run_cli, shapes_flags, tmp_path):
    def run(*extra: str) -> tuple[int, str]:
        rc, _, err = run_cli(
            "eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--quiet",
            "--num_workers", "0", "--feature_cache", tmp_path / "features", "--mitigation", "dfr", "cfr",
            "--cfr_epochs", "2", *extra,
        )
        return rc, err

    return run


def test_two_seeds_in_one_run_equal_two_separate_runs(seeds_eval, tmp_path):
    rc, err = seeds_eval("--seed", "0", "1", "--output", str(tmp_path / "r" / "{seed}.json"))
    assert rc == 0, err
    together = {seed: json.loads((tmp_path / "r" / f"{seed}.json").read_text()) for seed in (0, 1)}
    for seed in (0, 1):
        rc, err = seeds_eval("--seed", str(seed), "--output", str(tmp_path / "alone" / f"{seed}.json"))
        assert rc == 0, err
        alone = json.loads((tmp_path / "alone" / f"{seed}.json").read_text())
        assert together[seed]["robust"]["seed"] == alone["robust"]["seed"] == seed
        assert together[seed]["metrics"] == alone["metrics"]
        for method in ("dfr", "cfr"):
            assert without_seconds(together[seed]["robust"]["methods"][method]["hyperparameters"]) == \
                without_seconds(alone["robust"]["methods"][method]["hyperparameters"])
        assert together[seed]["robust"]["intervals"] == alone["robust"]["intervals"]
    # each seed was fitted with its own seed: DFR's group-balanced subsample differs
    dfr = [together[seed]["robust"]["methods"]["dfr"]["hyperparameters"] for seed in (0, 1)]
    assert [d["seed"] for d in dfr] == [0, 1] and dfr[0]["subsample_digest"] != dfr[1]["subsample_digest"]


def without_seconds(hyperparameters: dict) -> dict:
    return {k: v for k, v in hyperparameters.items() if k != "seconds"}


def test_several_seeds_need_seed_in_output(seeds_eval, tmp_path):
    rc, err = seeds_eval("--seed", "0", "1", "--output", str(tmp_path / "r.json"))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "{seed}" in lines[0] and "--output" in lines[0]
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "features").exists()


def test_one_seed_fills_seed_in_output(seeds_eval, tmp_path):
    rc, err = seeds_eval("--seed", "3", "--output", str(tmp_path / "s{seed}.json"))
    assert rc == 0, err
    assert json.loads((tmp_path / "s3.json").read_text())["robust"]["seed"] == 3
