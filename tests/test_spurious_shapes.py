"""robust/spurious_shapes: deterministic generation, group counts, masks/boxes, loading
rules, compatibility with clip_benchmark's wds reader, and the shipped tiny CLIP."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_robust_plugins.argtypes import add_config_flags, spec_config
from clip_robust_plugins.datasets import spurious_shapes as ss
from clip_robust_plugins.datasets.base import DatasetError
from clip_robust_plugins.datasets.wds import GroupedShards
from clip_robust_plugins.groups import GroupSchema
from clip_robust_plugins.specs import DatasetRequest, DatasetSpec

ASSETS = Path(ss.__file__).resolve().parents[1] / "assets"
SMALL = ss.ShapesConfig(train_size=40, val_size=18, test_size=16, correlation=0.9, image_size=24, seed=3)


def small_config(**overrides) -> ss.ShapesConfig:
    """The SMALL config with ``overrides`` (invalid values raise DatasetError, as flags would)."""
    return dataclasses.replace(SMALL, **overrides)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "data"
    ss.generate(root, SMALL, progress=False)
    return root


def read_split(ds: GroupedShards, split: str) -> tuple[list[str], np.ndarray]:
    keys, fields = [], []
    for key, _image, values in ds.samples(split, transform=None):
        keys.append(key)
        fields.append(values.numpy())
    return keys, np.stack(fields)


def raw_samples(root: Path, split: str) -> dict[str, dict[str, bytes]]:
    """Every tar member of a split, grouped by sample key (read with tarfile, not our reader)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def dataset_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files(tmp_path, small_root):
    again = tmp_path / "again"
    ss.generate(again, SMALL, progress=False)
    first, second = dataset_files(small_root), dataset_files(again)
    assert sorted(first) == sorted(second)
    assert {"train/0.tar", "val/0.tar", "test/0.tar", "groups.json"} <= set(first)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two generations with one seed"


def test_other_seed_gives_other_data(tmp_path, small_root):
    other = tmp_path / "other"
    ss.generate(other, ss.ShapesConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1}), progress=False)
    for split in ss.SPLITS:
        assert (other / split / "0.tar").read_bytes() != (small_root / split / "0.tar").read_bytes()
    a, b = GroupedShards(small_root), GroupedShards(other)
    assert read_split(a, "test")[1].tolist() != read_split(b, "test")[1].tolist()


def test_splits_use_independent_streams():
    # the seed sequence [seed, split] must not make seed s+1's train split equal seed s's val split
    a = next(ss.iter_split(ss.ShapesConfig(seed=0), "val"))[1]
    b = next(ss.iter_split(ss.ShapesConfig(seed=1), "train"))[1]
    assert np.asarray(a).tobytes() != np.asarray(b).tobytes()


def test_keys_are_readable_and_dot_free(small_root):
    keys, _ = read_split(GroupedShards(small_root), "train")
    assert keys[0] == "shapes_train_000000"
    assert keys == sorted(keys) and len(set(keys)) == SMALL.train_size
    assert all("." not in k for k in keys)


# ---------------------------------------------------------------- group counts
def test_group_counts(small_root):
    ds = GroupedShards(small_root)
    schema = ds.schema
    assert schema.group_names() == ["y:square_a:land", "y:square_a:water", "y:diamond_a:land", "y:diamond_a:water"]
    recomputed = {}
    for split in ss.SPLITS:
        _keys, fields = read_split(ds, split)
        recomputed[split] = np.bincount(schema.group_ids(fields), minlength=4)
        assert tuple(recomputed[split]) == tuple(schema.split_counts[split]), split
    # train: 20 per class, round(0.9 * 20) = 18 on the class's own background (a == y)
    assert recomputed["train"].tolist() == [18, 2, 2, 18]
    # val 18 rounds down to 16; both balanced over the 4 groups
    assert recomputed["val"].tolist() == [4, 4, 4, 4]
    assert recomputed["test"].tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("train_size, correlation", [(2000, 0.95), (41, 0.7), (10, 1.0), (10, 0.0)])
def test_train_correlation_is_respected(train_size, correlation):
    cfg = ss.ShapesConfig(train_size=train_size, correlation=correlation)
    counts = cfg.group_counts("train")
    assert counts.sum() == train_size
    aligned = counts[0] + counts[3]
    assert abs(aligned / train_size - correlation) <= 1.0 / train_size + 1e-9


# ---------------------------------------------------------------- masks and boxes
def test_masks_and_boxes_are_consistent(small_root):
    samples = raw_samples(small_root, "val")
    assert len(samples) == 16
    size = SMALL.image_size
    for key, entries in samples.items():
        assert {"png", "cls", "json", "mask.png"} <= set(entries), key
        meta = json.loads(entries["json"])
        mask = np.asarray(Image.open(io.BytesIO(entries["mask.png"])))
        assert Image.open(io.BytesIO(entries["mask.png"])).mode == "L"
        assert mask.shape == (size, size)
        assert set(np.unique(mask).tolist()) == {0, 255}
        x0, y0, x1, y1 = meta["box"]
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        inside = np.zeros_like(mask, dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert not mask[~inside].any(), f"{key}: mask outside its box"
        # the box is tight: the object touches every side of it
        assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
        assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()
        # the mask marks the drawn object: its pixels differ in colour from the background
        image = np.asarray(Image.open(io.BytesIO(entries["png"])).convert("RGB")).astype(float)
        fg, bg = image[mask > 0].mean(0), image[mask == 0].mean(0)
        assert np.abs(fg - bg).max() > 30, key
        assert int(entries["cls"]) == meta["y"]


def test_square_and_diamond_masks_have_their_shape():
    rng = np.random.default_rng(0)
    square = ss._shape_mask("square", 8.0, 64, rng)
    diamond = ss._shape_mask("diamond", 8.0, 64, rng)
    for mask in (square, diamond):  # equal areas: pi * 8^2
        assert abs(mask.sum() - np.pi * 64) / (np.pi * 64) < 0.1
    x0, y0, x1, y1 = ss.mask_box(square)
    assert square[y0:y1, x0:x1].all()  # a square fills its box
    x0, y0, x1, y1 = ss.mask_box(diamond)
    assert 0.4 < diamond[y0:y1, x0:x1].mean() < 0.6  # a diamond fills half of it
    assert not diamond[y0, x0] and not diamond[y1 - 1, x1 - 1]


# ---------------------------------------------------------------- loading rules
def test_loader_generates_then_reuses(tmp_path, capsys):
    root = tmp_path / "fresh"
    ds = ss.load_spurious_shapes(DatasetRequest(str(root), config=small_config()))
    assert "generating robust/spurious_shapes" in capsys.readouterr().err
    assert isinstance(ds, GroupedShards)
    assert ds.splits() == ("test", "train", "val")
    assert ds.classnames == list(ss.CLASSNAMES) and ds.templates == list(ss.TEMPLATES)
    stored = json.loads((root / "groups.json").read_text())["generator"]
    assert stored["name"] == "spurious_shapes" and stored["config"] == SMALL.to_json()
    before = (root / "train" / "0.tar").stat().st_mtime_ns
    again = ss.load_spurious_shapes(DatasetRequest(str(root), config=small_config()))
    assert "generating" not in capsys.readouterr().err
    assert (root / "train" / "0.tar").stat().st_mtime_ns == before
    assert again.fingerprint("test") == ds.fingerprint("test")


def test_config_mismatch_raises(small_root):
    with pytest.raises(DatasetError) as info:
        ss.load_spurious_shapes(DatasetRequest(str(small_root), config=small_config(seed=99)))
    message = str(info.value)
    assert "\n" not in message
    assert str(small_root) in message and "--dataset_root" in message and "seed" in message
    # no config (a reader called directly) means the defaults, which differ from the stored small config
    with pytest.raises(DatasetError, match="train_size"):
        ss.load_spurious_shapes(DatasetRequest(str(small_root)))


def test_refuses_foreign_directory_and_other_generators(tmp_path, small_root):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="refusing to generate"):
        ss.load_spurious_shapes(DatasetRequest(str(foreign), config=small_config()))
    assert (foreign / "notes.txt").read_text() == "keep me"

    other = tmp_path / "other"
    other.mkdir()
    (other / "groups.json").write_text(json.dumps(GroupSchema.read(small_root / "groups.json").to_json()))
    with pytest.raises(DatasetError, match="not generated by robust/spurious_shapes"):
        ss.load_spurious_shapes(DatasetRequest(str(other), config=small_config()))


def test_bad_flags_are_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="--shapes_correlation"):
        ss.load_spurious_shapes(DatasetRequest(str(tmp_path / "x"), config=small_config(correlation=1.5)))
    with pytest.raises(DatasetError, match="--shapes_test_size"):
        ss.load_spurious_shapes(DatasetRequest(str(tmp_path / "x"), config=small_config(test_size=3)))


# ---------------------------------------------------------------- hooks
def test_hooks_register_the_dataset_and_its_flags():
    specs: list[DatasetSpec] = []
    ss.register_datasets(specs.append)
    assert [s.name for s in specs] == ["spurious_shapes"]
    assert specs[0].load is ss.load_spurious_shapes and specs[0].description

    assert specs[0].options is ss.ShapesConfig and specs[0].option_prefix == "shapes_"
    parser = argparse.ArgumentParser()
    add_config_flags(parser, specs[0].options, specs[0].option_prefix)
    defaults = parser.parse_args([])
    # flags default to None: the dataclass is the one source of defaults (and the help shows them)
    assert spec_config(specs[0], defaults) == ss.ShapesConfig()
    assert (ss.ShapesConfig().train_size, ss.ShapesConfig().val_size, ss.ShapesConfig().test_size) == (2000, 400, 400)
    assert "(default: 2000)" in parser.format_help() and "(default: 0.95)" in parser.format_help()
    parsed = parser.parse_args(["--shapes_seed", "5", "--shapes_correlation", "0.8"])
    assert spec_config(specs[0], parsed) == ss.ShapesConfig(seed=5, correlation=0.8)
    for action in parser._actions:
        if action.dest.startswith("shapes_"):
            assert action.help, action.dest


# ---------------------------------------------------------------- clip_benchmark compatibility
@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")  # clip_benchmark's own WebDataset call
def test_plain_clip_benchmark_reads_the_shards(small_root):
    from clip_benchmark.datasets.builder import build_dataset
    from torchvision.transforms import ToTensor

    cb = build_dataset("wds/spurious_shapes", root=str(small_root), split="test", transform=ToTensor())
    assert cb.classes == list(ss.CLASSNAMES)
    assert cb.templates == list(ss.TEMPLATES)
    cb_labels, cb_images = [], []
    for image, label in cb:
        cb_images.append(image)
        cb_labels.append(int(label))
    ours = list(GroupedShards(small_root).samples("test", ToTensor()))
    assert cb_labels == [int(fields[0]) for _key, _image, fields in ours]
    for a, (_key, b, _fields) in zip(cb_images, ours):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the shipped tiny CLIP
@pytest.fixture(scope="module")
def default_benchmark(tmp_path_factory) -> GroupedShards:
    root = tmp_path_factory.mktemp("default") / "spurious_shapes"
    return ss.load_spurious_shapes(DatasetRequest(str(root)))


def test_shipped_checkpoint_is_spurious_on_the_default_test_split(default_benchmark):
    import open_clip

    checkpoint = ASSETS / "crp-tiny_spurious_shapes.safetensors"
    assert checkpoint.stat().st_size < 8 * 2**20
    open_clip.add_model_config(ASSETS / "crp-tiny.json")
    model, _, preprocess = open_clip.create_model_and_transforms("crp-tiny", pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("crp-tiny")
    model.eval()
    ds = default_benchmark
    with torch.no_grad():
        head = []
        for c in ds.classnames:
            emb = model.encode_text(tokenizer([t.format(c=c) for t in ds.templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            head.append(emb.mean(0) / emb.mean(0).norm())
        head = torch.stack(head)
        images, fields = [], []
        for _key, image, values in ds.samples("test", preprocess):
            images.append(image)
            fields.append(values)
        feats = model.encode_image(torch.stack(images))
        feats = feats / feats.norm(dim=-1, keepdim=True)
    fields = torch.stack(fields).numpy()
    pred = (feats @ head.T).argmax(1).numpy()
    y, groups = fields[:, 0], ds.schema.group_ids(fields)
    assert np.bincount(groups).tolist() == [100, 100, 100, 100]
    mean_acc = float((pred == y).mean())
    group_acc = [float((pred[groups == g] == y[groups == g]).mean()) for g in range(4)]
    assert mean_acc >= 0.6, (mean_acc, group_acc)
    assert min(group_acc) <= mean_acc - 0.2, (mean_acc, group_acc)


def test_groups_json_records_what_the_samples_carry(shapes_root):
    """Readers decide masks, boxes and region labels from groups.json, without reading a sample."""
    from clip_robust_plugins.datasets.wds import GroupedShards

    data = GroupedShards(shapes_root)
    for split in data.splits():
        record = data.sample_annotations(split)
        n = sum(data.schema.counts(split))
        assert record["samples"] == n and record["mask"] is True and record["box"] is True
        assert record["json_keys"]["y"] == record["json_keys"]["a"] == n and "object_quadrant" not in record["json_keys"]
