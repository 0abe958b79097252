"""``export_wds`` and interoperability with plain clip_benchmark, both ways."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_robust_plugins.datasets.wds import GroupedShards
from clip_robust_plugins.groups import GroupSchema
from fixture_formats import FOLDER_COUNTS, WATERBIRDS_COUNTS, shapes_image, write_imagefolder, write_waterbirds

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "clip_robust_plugins" / "assets"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def export(run_cli, *args) -> tuple[int, str, str]:
    return run_cli("export_wds", "--no_progress", *args)


def test_export_is_byte_identical_across_workers_and_copies_the_jpegs(run_cli, tmp_path):
    source = tmp_path / "waterbirds"
    rows = write_waterbirds(source)
    outs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"shards{workers}"
        rc, _, err = export(run_cli, "--dataset", "robust/waterbirds", "--dataset_root", source, "--output_dir", out,
                            "--num_workers", workers, "--shard_size", "4")
        assert rc == 0, err
        outs[workers] = tree_bytes(out)
    assert outs["0"] == outs["2"]
    root = tmp_path / "shards0"
    # 14 samples, at most 4 per shard, spread over at least 8 shards (--min_shards): 2 per shard
    assert (root / "train" / "nshards.txt").read_text() == "7\n"
    doc = json.loads((root / "groups.json").read_text())
    schema = GroupSchema.read(root / "groups.json")
    assert {s: list(schema.counts(s)) for s in ("train", "val", "test")} == WATERBIRDS_COUNTS
    assert [f.values for f in schema.fields] == [("landbird", "waterbird"), ("land", "water")]
    assert doc["source"] == {
        "dataset": "robust/waterbirds", "plugin": "clip_robust_plugins.datasets.waterbirds",
        "options": {"waterbirds_metadata": "metadata.csv"},
    }
    assert (root / "classnames.txt").read_text() == "landbird\nwaterbird\n"
    # the original JPEG bytes, under keys derived from img_filename, with the labels of metadata.csv
    members = {}
    for shard in sorted((root / "test").glob("*.tar")):
        members.update(tar_members(shard))
    test_rows = [r for r in rows if r["split"] == "2"]
    shards = GroupedShards(root)
    got = [(key, fields.tolist()) for key, _, fields in shards.samples("test", None)]
    from clip_robust_plugins.datasets.files import key_from_path

    expected = sorted((key_from_path(r["img_filename"]), [int(r["y"]), int(r["place"])]) for r in test_rows)
    assert got == expected
    for r in test_rows:
        key = key_from_path(r["img_filename"])
        assert members[f"{key}.jpg"] == (source / r["img_filename"]).read_bytes()
        assert json.loads(members[f"{key}.json"])["place_filename"] == r["place_filename"]


def test_export_of_grouped_shards_keeps_order_masks_and_boxes(run_cli, shapes_root, shapes_flags, tmp_path):
    """An iterable source (spurious_shapes' own shards), encoded by a process pool in order."""
    flags = [f for f in shapes_flags if f not in ("--dataset", "robust/spurious_shapes")]
    trees = []
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        rc, _, err = export(run_cli, "--dataset", "spurious_shapes", *flags, "--output_dir", out, "--num_workers", workers)
        assert rc == 0, err
        trees.append(tree_bytes(out))
    assert trees[0] == trees[1]
    source, exported = GroupedShards(shapes_root), GroupedShards(tmp_path / "out0")
    for split in ("train", "val", "test"):
        assert list(exported.schema.counts(split)) == list(source.schema.counts(split))
        assert [k for k, _, _ in exported.samples(split, None)] == [k for k, _, _ in source.samples(split, None)]
    members = tar_members(tmp_path / "out0" / "test" / "0.tar")
    first = sorted(k for k in members if k.endswith(".json"))[0][: -len(".json")]
    assert f"{first}.mask.png" in members and len(json.loads(members[f"{first}.json"])["box"]) == 4
    src_members = tar_members(shapes_root / "test" / "0.tar")
    assert Image.open(io.BytesIO(members[f"{first}.png"])).tobytes() == Image.open(io.BytesIO(src_members[f"{first}.png"])).tobytes()
    doc = json.loads((tmp_path / "out0" / "groups.json").read_text())
    assert doc["source"]["options"]["shapes_train_size"] == int(flags[flags.index("--shapes_train_size") + 1])


def test_export_of_a_third_party_dataset(run_cli, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples" / "crp-example-plugin"))
    out = tmp_path / "stripes_shards"
    rc, _, err = export(run_cli, "--plugin", "crp_example_plugin", "--dataset", "robust/example_stripes",
                        "--dataset_root", tmp_path / "stripes", "--stripes_size", "12", "--output_dir", out)
    assert rc == 0, err
    from crp_example_plugin import stripes

    schema = GroupSchema.read(out / "groups.json")
    for split in ("train", "val", "test"):
        assert list(schema.counts(split)) == list(stripes.group_counts(12, split))
    doc = json.loads((out / "groups.json").read_text())
    assert doc["source"] == {"dataset": "robust/example_stripes", "plugin": "crp_example_plugin", "options": {"stripes_size": 12}}


def test_partial_export_keeps_train_counts_and_bad_input_writes_nothing(run_cli, tmp_path, tiny_pretrained):
    source = tmp_path / "folders"
    write_imagefolder(source)
    out = tmp_path / "test_only"
    rc, _, err = export(run_cli, "--dataset", "robust/imagefolder", "--dataset_root", source, "--output_dir", out,
                        "--splits", "test", "--num_workers", "0")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["test"]
    schema = GroupSchema.read(out / "groups.json")
    classes, attrs = ("diamond", "square"), ("land", "water")
    assert list(schema.counts("train")) == [FOLDER_COUNTS["train"][(c, a)] for c in classes for a in attrs]
    rc, _, err = run_cli("eval", "--dataset", "wds/folders", "--dataset_root", out, "--model", "crp-tiny",
                         "--pretrained", tiny_pretrained, "--num_workers", "0", "--no_feature_cache",
                         "--output", tmp_path / "res.json")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "res.json").read_text())["metrics"]
    accs = [metrics[f"zeroshot/group_acc/y:{c}_a:{a}"] for c in classes for a in attrs]
    train = np.asarray(schema.counts("train"), dtype=float)
    assert metrics["zeroshot/acc_train_weighted"] == pytest.approx(float(train @ accs / train.sum()), abs=1e-12)

    # a non-empty folder that is not an earlier export is refused; re-exporting over an export is fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, _, err = export(run_cli, "--dataset", "robust/imagefolder", "--dataset_root", source, "--output_dir", other)
    assert rc == 2 and "not empty and not an earlier export" in err and (other / "notes.txt").exists()
    rc, _, err = export(run_cli, "--dataset", "robust/imagefolder", "--dataset_root", source, "--output_dir", tmp_path)
    assert rc == 2 and "must not be the dataset root or a folder above it" in err
    # an undecodable image: one line naming it, and the earlier export is left as it was
    before = tree_bytes(out)
    bad = source / "test" / "square" / "land" / "square_land_000.png"
    bad.write_bytes(b"\x89PNG broken")
    rc, _, err = export(run_cli, "--dataset", "robust/imagefolder", "--dataset_root", source, "--output_dir", out,
                        "--num_workers", "2")
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("clip_benchmark_robust: error:") and f"{bad}: unreadable image" in last
    assert "Traceback" not in err
    assert tree_bytes(out) == before and not list(out.glob(".staging-*"))


# ------------------------------------------------------------- plain clip_benchmark
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The shipped crp-tiny checkpoint as an open_clip ``local-dir:`` model, which plain
    clip_benchmark loads with its own ``--model local-dir:DIR`` (no plugin needed)."""
    root = tmp_path_factory.mktemp("model") / "crp_tiny"
    root.mkdir()
    config = {"model_cfg": json.loads((ASSETS / "crp-tiny.json").read_text())}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copy(ASSETS / "crp-tiny_spurious_shapes.safetensors", root / "open_clip_model.safetensors")
    return root


def plain_clip_benchmark(argv: list[str], cwd: Path) -> None:
    """``clip_benchmark`` itself in a fresh process.  On numpy >= 2.4 its zero-shot
    ``accuracy()`` crashes (``float()`` of an array; see tests/test_cli.py, which asserts
    that crash), so there its ``main()`` runs with only that function replaced."""
    if tuple(int(x) for x in np.__version__.split(".")[:2]) < (2, 4):
        cmd = ["clip_benchmark", *argv]
    else:
        shim = (
            "import sys, clip_benchmark.metrics.zeroshot_classification as z\n"
            "from clip_robust_plugins.compat import accuracy\n"
            "z.accuracy = accuracy\n"
            "from clip_benchmark.cli import main\n"
            "sys.argv = ['clip_benchmark'] + sys.argv[1:]\n"
            "main()\n"
        )
        cmd = [sys.executable, "-c", shim, *argv]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_plain_clip_benchmark_reads_exported_shards_with_our_accuracy(run_cli, tmp_path, tiny_model_dir):
    """Acceptance: export_wds -> plain `clip_benchmark eval --dataset wds/NAME` -> its acc1 == our zeroshot/acc."""
    source = tmp_path / "folders"
    write_imagefolder(source)
    shards = tmp_path / "shards"
    rc, _, err = export(run_cli, "--dataset", "robust/imagefolder", "--dataset_root", source, "--output_dir", shards,
                        "--num_workers", "0")
    assert rc == 0, err
    argv = ["eval", "--dataset", "wds/shapes_folders", "--dataset_root", str(shards),
            "--model", f"local-dir:{tiny_model_dir}", "--num_workers", "0"]
    plain_clip_benchmark([*argv, "--output", str(tmp_path / "plain.json")], cwd=tmp_path)
    rc, _, err = run_cli(*argv, "--no_feature_cache", "--output", tmp_path / "ours.json")
    assert rc == 0, err
    plain = json.loads((tmp_path / "plain.json").read_text())["metrics"]
    ours = json.loads((tmp_path / "ours.json").read_text())["metrics"]
    assert plain["acc1"] == ours["zeroshot/acc"] == ours["acc1"]
    assert plain["mean_per_class_recall"] == pytest.approx(ours["zeroshot/balanced_acc"], abs=1e-12)
    assert 0.5 < ours["zeroshot/acc"] < 1.0  # the tiny model reads these images, imperfectly: a real comparison
    assert sum(ours[f"zeroshot/group_count/y:{c}_a:{a}"] for c, a in FOLDER_COUNTS["test"]) == 16


class _TinyImages(torch.utils.data.Dataset):
    """A plain (image, label) dataset with ``classes``/``templates``, as clip_benchmark's exporter takes."""

    classes = ["square", "diamond"]
    templates = ["a photo of a {c}.", "a {c} shape."]

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            y, a = i % 2, (i // 2) % 2
            self.items.append((Image.open(io.BytesIO(shapes_image(rng, y, a))).convert("RGB"), y))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 8 worker processes")  # clip_benchmark's exporter
def test_shards_from_clip_benchmarks_exporter_evaluate_at_class_level(run_cli, tmp_path, tiny_pretrained):
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    root = tmp_path / "cb_shards"
    for split, n, seed in (("train", 12, 0), ("test", 10, 1)):
        convert_dataset(_TinyImages(n, seed), split, str(root), transform=PIL_to_bytes("png"), image_format="png",
                        max_count=4, verbose=False)
    assert not (root / "groups.json").exists()
    common = ["eval", "--dataset", "wds/cb_shapes", "--dataset_root", root, "--model", "crp-tiny",
              "--pretrained", tiny_pretrained, "--num_workers", "0", "--feature_cache", tmp_path / "cache"]
    rc, stdout, err = run_cli(*common, "--mitigation", "erm_head", "--save_predictions", "--output", tmp_path / "res.json")
    assert rc == 0, err
    assert "no group metadata" in err
    dump = json.loads((tmp_path / "res.json").read_text())
    assert "no group metadata" in dump["robust"]["note"]
    metrics = dump["metrics"]
    rows = list(csv.DictReader(open(tmp_path / "res_predictions.csv")))
    assert len(rows) == 10
    for method in ("zeroshot", "erm_head"):
        per_class = {}
        for c, name in enumerate(_TinyImages.classes):
            mine = [r for r in rows if r["y"] == str(c)]
            per_class[name] = sum(r[f"pred_{method}"] == r["y"] for r in mine) / len(mine)
            assert metrics[f"{method}/group_acc/y:{name}"] == per_class[name]
            assert metrics[f"{method}/group_count/y:{name}"] == len(mine)
        assert metrics[f"{method}/worst_group_acc"] == metrics[f"{method}/worst_class_acc"] == min(per_class.values())
        assert metrics[f"{method}/balanced_acc"] == pytest.approx(np.mean(list(per_class.values())), abs=1e-12)
    assert metrics["acc1"] == metrics["zeroshot/acc"]
    assert len(dump["robust"]["feature_cache"]) == 2  # class-only features cache like any others (test, train)
    # methods that need group labels refuse, in one line, and write nothing
    rc, _, err = run_cli(*common, "--mitigation", "dfr", "--output", tmp_path / "dfr.json")
    assert rc == 2 and "dfr needs group labels" in err.strip().splitlines()[-1]
    assert not (tmp_path / "dfr.json").exists()


def test_plain_clip_benchmark_reads_a_40_image_export_with_4_workers(run_cli, tmp_path, tiny_model_dir):
    """Acceptance: a small split exported with the defaults spreads over 8 shards, so clip_benchmark's
    own reader at its default --num_workers 4 finds samples in every worker; acc1 equals ours."""
    shards = tmp_path / "shards"
    rc, _, err = export(run_cli, "--dataset", "robust/spurious_shapes", "--dataset_root", tmp_path / "gen",
                        "--shapes_train_size", "40", "--shapes_val_size", "40", "--shapes_test_size", "40",
                        "--output_dir", shards, "--num_workers", "0")
    assert rc == 0, err
    assert (shards / "test" / "nshards.txt").read_text() == "8\n"
    argv = ["eval", "--dataset", "wds/spurious_shapes", "--dataset_root", str(shards), "--model", f"local-dir:{tiny_model_dir}"]
    plain_clip_benchmark([*argv, "--num_workers", "4", "--output", str(tmp_path / "plain.json")], cwd=tmp_path)
    rc, _, err = run_cli(*argv, "--num_workers", "0", "--no_feature_cache", "--output", tmp_path / "ours.json")
    assert rc == 0, err
    plain = json.loads((tmp_path / "plain.json").read_text())["metrics"]
    ours = json.loads((tmp_path / "ours.json").read_text())["metrics"]
    assert plain["acc1"] == ours["zeroshot/acc"]
    assert sum(v for k, v in ours.items() if k.startswith("zeroshot/group_count/")) == 40


def test_export_help_text(capsys):
    from clip_robust_plugins import cli

    with pytest.raises(SystemExit):
        cli.main(["export_wds", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: clip_benchmark_robust export_wds")
    assert "--min_shards" in out and "--shapes_train_size" in out  # its own flags and the datasets'
    for foreign in ("--cfr_", "--dfr_", "--seraser_", "--ravl_", "--erm_head_C", "--mitigation"):
        assert foreign not in out
