"""Bad input through the CLI: one line naming the file (and key), exit 2, no traceback, nothing written.

Each case copies the session's small spurious_shapes root, damages it, and evaluates it as
``wds/spurious_shapes``.  ``--skip_bad_samples`` skips undecodable images only, and says so.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import webdataset as wds

TINY = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--quiet", "--no_amp"]
Sample = dict  # {"__key__": key, ext: bytes, ...}


def read_samples(tar_path: Path) -> list[Sample]:
    """The samples of a shard in order (files grouped by key)."""
    samples: list[Sample] = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(member).read()
    return samples


def write_samples(tar_path: Path, samples: list[Sample]) -> None:
    with open(tar_path, "wb") as fh:
        writer = wds.TarWriter(fh)
        for sample in samples:
            writer.write(sample)
        writer.close()


def edit_split(root: Path, edit: Callable[[list[Sample]], list[Sample]], split: str = "test") -> None:
    path = root / split / "0.tar"
    write_samples(path, edit(read_samples(path)))


def set_meta(sample: Sample, **values) -> Sample:
    meta = json.loads(sample["json"])
    meta.update(values)
    sample["json"] = json.dumps({k: v for k, v in meta.items() if v is not None}).encode()
    return sample


@pytest.fixture()
def root(shapes_root, tmp_path) -> Path:
    """A private copy of the session's small shapes root (test: 32 samples, one shard)."""
    copy = tmp_path / "data"
    shutil.copytree(shapes_root, copy)
    return copy


@pytest.fixture()
def evaluate(run_cli, tmp_path):
    """evaluate(root, *flags) -> (rc, stderr, results path); writes results, CSV and plot on success."""

    def run(root: Path, *extra, dataset: str = "wds/spurious_shapes") -> tuple[int, str, Path]:
        out = tmp_path / "out" / "results.json"
        rc, _, err = run_cli(
            "eval", "--dataset", dataset, "--dataset_root", root, *TINY, "--num_workers", "0",
            "--feature_cache", tmp_path / "cache", "--save_predictions", "--plot", "--output", out, *extra,
        )
        return rc, err, out

    return run


def error_line(rc: int, err: str, out: Path) -> str:
    """The single stderr line of a failed run (asserting exit 2, no traceback, no files written)."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("clip_benchmark_robust: error: ")
    assert "Traceback" not in err
    assert not out.parent.exists() or not any(out.parent.iterdir()), list(out.parent.iterdir())
    return lines[0]


def _garbage_png(samples: list[Sample]) -> list[Sample]:
    samples[3]["png"] = b"\x89PNG not really an image"
    return samples


CASES = {
    # name: (damage(root), the strings the error line must contain)
    "truncated_tar": (
        lambda r: _truncate_inside_member(r / "test/0.tar", 10),
        ["test/0.tar", "unreadable or truncated tar", "unexpected end of data"],
    ),
    "corrupt_tar": (
        lambda r: (r / "test/0.tar").write_bytes(b"this is not a tar file\n" * 100),
        ["test/0.tar", "unreadable or truncated tar"],
    ),
    "undecodable_image": (
        lambda r: edit_split(r, _garbage_png),
        ["test/0.tar", "'shapes_test_000003'", "undecodable image", "--skip_bad_samples"],
    ),
    "missing_nshards": (lambda r: (r / "test/nshards.txt").unlink(), ["test/nshards.txt", "file not found"]),
    "metadata_missing_column": (
        lambda r: edit_split(r, lambda s: [set_meta(x, a=None) if i == 5 else x for i, x in enumerate(s)]),
        ["test/0.tar", "'shapes_test_000005'", "KeyError", "'a'"],
    ),
    "label_out_of_range": (
        lambda r: edit_split(r, lambda s: [set_meta(x, y=7) if i == 2 else x for i, x in enumerate(s)]),
        ["test/0.tar", "'shapes_test_000002'", "field 'y' value 7 is out of range 0..1"],
    ),
    "attribute_out_of_range": (
        lambda r: edit_split(r, lambda s: [set_meta(x, a=-1) if i == 9 else x for i, x in enumerate(s)]),
        ["test/0.tar", "'shapes_test_000009'", "field 'a' value -1 is out of range 0..1"],
    ),
    "empty_group_declared_nonempty": (
        lambda r: edit_split(r, lambda s: [x for x in s if (json.loads(x["json"])["y"], json.loads(x["json"])["a"]) != (1, 1)]),
        ["data: split 'test' holds 0 samples of y:diamond_a:water", "groups.json declares 8"],
    ),
    "truncated_at_a_sample_boundary": (
        lambda r: _truncate_at_sample(r / "test/0.tar", 30),
        ["data: split 'test' holds", "groups.json declares", "(30 read, 32 declared"],
    ),
    "duplicate_key_in_shard": (
        lambda r: edit_split(r, lambda s: [*s, dict(s[4])]),
        ["test/0.tar", "'shapes_test_000004'", "duplicate key"],
    ),
    "duplicate_key_across_shards": (
        lambda r: _split_in_two_shards(r, duplicate=True),
        ["data: split 'test': duplicate sample key 'shapes_test_000000'"],
    ),
}


def _truncate_inside_member(tar_path: Path, index: int) -> None:
    """Cut a shard in the middle of member ``index``'s data (a download that stopped there)."""
    with tarfile.open(tar_path) as tar:
        member = tar.getmembers()[index]
    tar_path.write_bytes(tar_path.read_bytes()[: member.offset_data + member.size // 2])


def _truncate_at_sample(tar_path: Path, n_kept: int) -> None:
    """Cut a shard right before sample ``n_kept``: tarfile reads the rest as a valid, shorter archive."""
    offsets: dict[str, int] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            offsets.setdefault(member.name.split(".", 1)[0], member.offset)
    keys = list(offsets)
    assert len(keys) == 32
    tar_path.write_bytes(tar_path.read_bytes()[: offsets[keys[n_kept]]])


def _split_in_two_shards(root: Path, duplicate: bool) -> None:
    samples = read_samples(root / "test/0.tar")
    second = samples[16:]
    if duplicate:
        second[0] = {**samples[0]}
    write_samples(root / "test/0.tar", samples[:16])
    write_samples(root / "test/1.tar", second)
    (root / "test/nshards.txt").write_text("2\n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_the_file(case, root, evaluate):
    damage, needles = CASES[case]
    damage(root)
    rc, err, out = evaluate(root)
    line = error_line(rc, err, out)
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("case", ["corrupt_tar", "metadata_missing_column", "undecodable_image"])
def test_errors_from_dataloader_workers_stay_one_line(case, root, evaluate):
    damage, needles = CASES[case]
    damage(root)
    rc, err, out = evaluate(root, "--num_workers", "2")
    line = error_line(rc, err, out)
    assert "DataLoader worker" not in line
    for needle in needles:
        assert needle in line, line


def test_missing_groups_json(root, evaluate):
    """Without groups.json, wds/ shards have no group labels: a group method cannot run, and the
    grouped reader (here forced by --shard_pattern) names the missing file.  (robust/spurious_shapes
    regenerates its own directory instead: a missing groups.json marks it incomplete.)"""
    (root / "groups.json").unlink()
    rc, err, out = evaluate(root, "--mitigation", "dfr")
    assert "groups.json" in error_line(rc, err, out)
    rc, err, out = evaluate(root, "--shard_pattern", "{split}/0.tar")
    assert f"{root}/groups.json: file not found" in error_line(rc, err, out)


def test_skip_bad_samples_skips_only_undecodable_images_and_records_them(root, evaluate, tmp_path):
    edit_split(root, _garbage_png)
    rc, err, out = evaluate(root, "--skip_bad_samples")
    assert rc == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "skipped 1 undecodable sample(s) of split 'test'" in warning[0]
    assert "'shapes_test_000003'" in warning[0]
    dump = json.loads(out.read_text())
    assert dump["robust"]["skipped_samples"] == {"test": {"count": 1, "keys": ["shapes_test_000003"]}}
    counts = [v for k, v in dump["metrics"].items() if k.startswith("zeroshot/group_count/")]
    assert sum(counts) == 31
    rows = list(csv.DictReader(open(str(out).replace(".json", "_predictions.csv"))))
    assert len(rows) == 31 and "shapes_test_000003" not in {r["key"] for r in rows}
    # the incomplete split was not cached: a second run extracts it again and records the skip again
    assert not any("test" in str(p) for p in dump["robust"]["feature_cache"])
    rc, err, out = evaluate(root, "--skip_bad_samples")
    assert rc == 0, err
    again = json.loads(out.read_text())
    assert [e["split"] for e in again["robust"]["features_extracted"]] == ["test"]
    assert again["robust"]["skipped_samples"] == dump["robust"]["skipped_samples"]
    assert again["metrics"] == dump["metrics"]


@pytest.mark.parametrize("case", ["corrupt_tar", "metadata_missing_column"])
def test_skip_bad_samples_does_not_skip_other_bad_input(case, root, evaluate):
    damage, needles = CASES[case]
    damage(root)
    rc, err, out = evaluate(root, "--skip_bad_samples")
    line = error_line(rc, err, out)
    assert all(needle in line for needle in needles), line


def test_an_empty_group_declared_empty_is_evaluated(root, evaluate):
    """A group with no test sample that groups.json also declares empty is fine: count 0, accuracy null."""
    edit_split(root, lambda s: [x for x in s if (json.loads(x["json"])["y"], json.loads(x["json"])["a"]) != (1, 1)])
    groups = json.loads((root / "groups.json").read_text())
    groups["split_counts"]["test"][3] = 0
    (root / "groups.json").write_text(json.dumps(groups))
    rc, err, out = evaluate(root)
    assert rc == 0, err
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["zeroshot/group_count/y:diamond_a:water"] == 0
    assert metrics["zeroshot/group_acc/y:diamond_a:water"] is None  # strict JSON: null, the reason recorded
    assert metrics["zeroshot/worst_group_name"] != "y:diamond_a:water"


def test_traceback_only_on_request(root, evaluate, monkeypatch):
    (root / "test/0.tar").write_bytes(b"garbage" * 300)
    monkeypatch.setenv("CLIP_ROBUST_DEBUG", "1")
    rc, err, out = evaluate(root)
    assert rc == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("clip_benchmark_robust: error: ")
    assert f"{root}/test/0.tar" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_console_script_stderr_is_one_line_with_workers(root, tmp_path):
    """The real process: nothing else reaches stderr (worker tracebacks, warnings), exit status 2."""
    (root / "test/0.tar").write_bytes(b"garbage" * 300)
    script = shutil.which("clip_benchmark_robust") or str(Path(sys.executable).parent / "clip_benchmark_robust")
    argv = [script, "eval", "--dataset", "wds/spurious_shapes", "--dataset_root", str(root), *TINY,
            "--num_workers", "2", "--no_feature_cache", "--output", str(tmp_path / "out" / "r.json")]
    env = {k: v for k, v in os.environ.items() if k != "CLIP_ROBUST_DEBUG"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"clip_benchmark_robust: error: {root}/test/0.tar: unreadable or truncated tar (ReadError: invalid header)"
    ], done.stderr
    assert not (tmp_path / "out").exists()
