"""Spawrious, MetaShift, ImageNet-9 and CounterAnimal: exact group counts from fixtures in the released
layouts, their options and metrics, and that they are built with the public reader kit only."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from clip_robust_plugins import DatasetError, DatasetRequest, Predictions
from clip_robust_plugins.datasets import counteranimal, imagenet9, metashift, spawrious
from fixture_formats import (
    COUNTERANIMAL_FOLDERS,
    IN9_CLASSES,
    IN9_VARIANTS,
    METASHIFT_COUNTS,
    SPAWRIOUS_CLASSES,
    SPAWRIOUS_LOCATIONS,
    in9_size,
    write_counteranimal,
    write_imagenet9,
    write_metashift,
    write_spawrious,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "clip_robust_plugins"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "crp-example-plugin" / "crp_example_plugin"
KIT_MODULES = [SRC / "datasets" / f"{m}.py" for m in ("spawrious", "metashift", "imagenet9", "counteranimal")]
PUBLIC = {"clip_robust_plugins", "clip_robust_plugins.readers"}


def counts(ds, split: str) -> list[int]:
    return [int(c) for c in ds.schema.counts(split)]


# ----------------------------------------------------------------- public kit only
@pytest.mark.parametrize("path", [*KIT_MODULES, EXAMPLE / "photos.py"], ids=lambda p: p.stem)
def test_reader_uses_only_the_public_kit(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 or path.parent == EXAMPLE, f"{path.name}: relative import"
            module = node.module or ""
            if module.startswith("clip_robust_plugins"):
                assert module in PUBLIC, f"{path.name} imports from {module}"
            assert not [a.name for a in node.names if a.name.startswith("_")], f"{path.name}: private name"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("clip_robust_plugins."), f"{path.name} imports {alias.name}"


# ----------------------------------------------------------------------- Spawrious
#: restated from spawrious/torch.py (_get_combinations): per class, the train and the test locations
#: (o2o: the train location in both environments plus the filler location)
SPAWRIOUS_TABLE = {
    "o2o_easy": ("beach", {"bulldog": ("desert", "dirt"), "dachshund": ("jungle", "snow"),
                           "labrador": ("dirt", "desert"), "corgi": ("snow", "jungle")}),
    "o2o_medium": ("desert", {"bulldog": ("mountain", "jungle"), "dachshund": ("beach", "dirt"),
                              "labrador": ("dirt", "beach"), "corgi": ("jungle", "snow")}),
    "o2o_hard": ("beach", {"bulldog": ("jungle", "mountain"), "dachshund": ("mountain", "snow"),
                           "labrador": ("snow", "desert"), "corgi": ("desert", "jungle")}),
    "m2m_easy": (None, {"bulldog": (("desert", "mountain"), ("dirt", "jungle")),
                        "dachshund": (("mountain", "desert"), ("jungle", "dirt")),
                        "labrador": (("dirt", "jungle"), ("mountain", "desert")),
                        "corgi": (("jungle", "dirt"), ("desert", "mountain"))}),
    "m2m_medium": (None, {"bulldog": (("beach", "snow"), ("desert", "mountain")),
                          "dachshund": (("snow", "beach"), ("mountain", "desert")),
                          "labrador": (("mountain", "desert"), ("beach", "snow")),
                          "corgi": (("desert", "mountain"), ("snow", "beach"))}),
    "m2m_hard": (None, {"bulldog": (("dirt", "jungle"), ("snow", "beach")),
                        "dachshund": (("jungle", "dirt"), ("beach", "snow")),
                        "labrador": (("snow", "beach"), ("dirt", "jungle")),
                        "corgi": (("beach", "snow"), ("jungle", "dirt"))}),
}


def expected_spawrious(benchmark: str, total: int, sizes: dict[str, int]) -> dict[str, list[int]]:
    filler, table = SPAWRIOUS_TABLE[benchmark]
    out = {s: [0] * (len(SPAWRIOUS_CLASSES) * len(SPAWRIOUS_LOCATIONS)) for s in ("train", "test")}

    def add(split, cls, loc, n):
        out[split][SPAWRIOUS_CLASSES.index(cls) * len(SPAWRIOUS_LOCATIONS) + SPAWRIOUS_LOCATIONS.index(loc)] += n

    for cls, (train, test) in table.items():
        if filler:  # o2o: 97 % / 87 % of `total` from env 0 / 1, the rest from the filler location
            lim0, lim1 = int(0.97 * total), int(0.87 * total)
            add("train", cls, train, min(lim0, sizes[f"0/{train}/{cls}"]) + min(lim1, sizes[f"1/{train}/{cls}"]))
            add("train", cls, filler, min(total - lim0, sizes[f"0/{filler}/{cls}"])
                + min(total - lim1, sizes[f"1/{filler}/{cls}"]))
            add("test", cls, test, sizes[f"0/{test}/{cls}"] + sizes[f"1/{test}/{cls}"])
        else:  # m2m: everything from folder 0, `total` per train location
            for loc in train:
                add("train", cls, loc, min(total, sizes[f"0/{loc}/{cls}"]))
            for loc in test:
                add("test", cls, loc, sizes[f"0/{loc}/{cls}"])
    return out


@pytest.fixture(scope="module")
def spawrious_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("spawrious")
    return root, write_spawrious(root)


@pytest.mark.parametrize("challenge", list(SPAWRIOUS_TABLE))
def test_spawrious_benchmarks_give_the_authors_combinations(spawrious_root, challenge):
    root, sizes = spawrious_root
    config = spawrious.SpawriousConfig(benchmark=challenge, total=10)
    ds = spawrious.load_spawrious(DatasetRequest(str(root), config=config))
    assert ds.splits() == ("train", "test")
    assert ds.classnames == list(SPAWRIOUS_CLASSES)
    expected = expected_spawrious(challenge, 10, sizes)
    assert {s: counts(ds, s) for s in ds.splits()} == expected
    # the first images by name are taken when a limit binds (the authors take os.listdir's first)
    if challenge == "o2o_easy":
        bulldog = sorted(r.key for r in ds.rows("train") if r.values == (0, SPAWRIOUS_LOCATIONS.index("beach")))
        assert bulldog == ["0%2Fbeach%2Fbulldog%2F0", "1%2Fbeach%2Fbulldog%2F0", "1%2Fbeach%2Fbulldog%2F1"]


def test_spawrious_default_total_takes_every_image_of_small_folders_and_names_missing_ones(spawrious_root, tmp_path):
    root, sizes = spawrious_root
    ds = spawrious.load_spawrious(DatasetRequest(str(root / "spawrious224")))  # the release folder itself
    train_folders = [f"{e}/{where}/{c}" for c, (loc, _) in SPAWRIOUS_TABLE["o2o_easy"][1].items()
                     for where in (loc, "beach") for e in (0, 1)]
    assert sum(counts(ds, "train")) == sum(sizes[f] for f in train_folders)
    (tmp_path / "spawrious224" / "0" / "desert").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"0/desert/bulldog: robust/spawrious o2o_easy train \(bulldog in desert\) "
                                           r"folder not found"):
        spawrious.load_spawrious(DatasetRequest(str(tmp_path)))
    with pytest.raises(DatasetError, match="--spawrious_total must be at least 1"):
        spawrious.SpawriousConfig(total=0)


# ----------------------------------------------------------------------- MetaShift
def test_metashift_keeps_the_released_shift(tmp_path):
    write_metashift(tmp_path)
    ds = metashift.load_metashift(DatasetRequest(str(tmp_path)))
    assert ds.splits() == ("train", "test") and ds.classnames == ["dog", "cat"]
    # groups y * 2 + a: (dog, outdoor), (dog, indoor), (cat, outdoor), (cat, indoor)
    n = METASHIFT_COUNTS
    assert counts(ds, "train") == [n["train/dog/dog(outdoor)"], 0, 0, n["train/cat/cat(indoor)"]]
    assert counts(ds, "test") == [0, n["test/dog/dog(indoor)"], n["test/cat/cat(outdoor)"], 0]


def test_metashift_subpopbench_resplit_is_seeded_and_matches_the_authors_draws(tmp_path):
    write_metashift(tmp_path)
    config = metashift.MetaShiftConfig(split="subpopbench")
    ds = metashift.load_metashift(DatasetRequest(str(tmp_path / metashift.RELEASE_DIR), config=config))
    total = sum(METASHIFT_COUNTS.values())
    sizes = {s: sum(counts(ds, s)) for s in ds.splits()}
    assert sizes == {"train": total - int(total * 0.25) - int(total * 0.1), "val": int(total * 0.1),
                     "test": int(total * 0.25)}
    # SubpopBench's generate_metadata_metashift, restated: folders in its order, files sorted
    pooled = [f"{folder}/{p.name}" for folder in METASHIFT_COUNTS
              for p in sorted((tmp_path / metashift.RELEASE_DIR / folder).iterdir())]
    rng = np.random.RandomState(42)
    test_idx = rng.choice(np.arange(total), size=int(total * 0.25), replace=False)
    val_idx = rng.choice(np.setdiff1d(np.arange(total), test_idx), size=int(total * 0.1), replace=False)
    from clip_robust_plugins.readers import key_from_path

    assert sorted(r.key for r in ds.rows("test")) == sorted(key_from_path(pooled[i]) for i in test_idx)
    assert sorted(r.key for r in ds.rows("val")) == sorted(key_from_path(pooled[i]) for i in val_idx)
    other = metashift.load_metashift(DatasetRequest(str(tmp_path), config=metashift.MetaShiftConfig("subpopbench", 7)))
    assert {r.key for r in other.rows("test")} != {r.key for r in ds.rows("test")}
    assert ds.fingerprint("test") != other.fingerprint("test")


# ---------------------------------------------------------------------- ImageNet-9
def test_imagenet9_variants_are_splits_and_all_has_the_variant_as_group(tmp_path):
    write_imagenet9(tmp_path, variants=("original", "mixed_same", "mixed_rand"))
    ds = imagenet9.load_imagenet9(DatasetRequest(str(tmp_path)))
    assert ds.splits() == ("all", "mixed_rand", "mixed_same", "original")
    assert ds.classnames[:3] == ["dog", "bird", "wheeled vehicle"] and len(ds.classnames) == 9
    for split in ("all", "original", "mixed_same", "mixed_rand"):
        expected = [0] * (9 * len(IN9_VARIANTS))
        for v in ("original", "mixed_same", "mixed_rand"):
            if split in ("all", v):
                for y, c in enumerate(IN9_CLASSES):
                    expected[y * len(IN9_VARIANTS) + IN9_VARIANTS.index(v)] = in9_size(v, c)
        assert counts(ds, split) == expected, split


def test_imagenet9_refuses_variants_with_other_classes(tmp_path):
    write_imagenet9(tmp_path, variants=("original", "only_fg"))
    (tmp_path / "only_fg" / "val" / "08_fish").rename(tmp_path / "only_fg" / "val" / "08_fishes")
    with pytest.raises(DatasetError, match=r"only_fg/val: class folders .* differ from"):
        imagenet9.load_imagenet9(DatasetRequest(str(tmp_path)))


def test_bg_gap_is_mixed_same_minus_mixed_rand_accuracy():
    schema = imagenet9.two_field_schema(["a", "b"], imagenet9.VARIANTS, attribute_field="variant")
    same, rand, orig = (imagenet9.VARIANTS.index(v) for v in ("mixed_same", "mixed_rand", "original"))
    fields = np.array([[0, same], [1, same], [1, same], [0, rand], [1, rand], [0, orig]])
    pred = np.array([0, 1, 0, 1, 1, 1])  # mixed_same 2/3 right, mixed_rand 1/2, original ignored
    got = imagenet9.bg_gap(Predictions("m", "all", tuple("abcdef"), pred, fields, schema))
    assert got["bg_gap"] == pytest.approx(2 / 3 - 1 / 2)
    assert got["bg_gap/mixed_same_acc"] == pytest.approx(2 / 3) and got["bg_gap/mixed_rand_acc"] == 0.5
    only_orig = Predictions("m", "original", ("f",), pred[-1:], fields[-1:], schema)
    assert imagenet9.bg_gap(only_orig) == {}
    other = imagenet9.two_field_schema(["a", "b"], ["x", "y"])
    assert imagenet9.bg_gap(Predictions("m", "t", ("a",), pred[:1], np.array([[0, 0]]), other)) == {}


def test_eval_on_imagenet9_all_reports_the_bg_gap(run_cli, tmp_path, tiny_pretrained):
    write_imagenet9(tmp_path / "bg", variants=("mixed_same", "mixed_rand"))
    out = tmp_path / "res.json"
    rc, _, err = run_cli(
        "eval", "--dataset", "robust/imagenet9", "--dataset_root", tmp_path / "bg", "--split", "all",
        "--model", "crp-tiny", "--pretrained", tiny_pretrained, "--num_workers", "0", "--no_feature_cache",
        "--no_amp", "--save_predictions", "--output", out,
    )
    assert rc == 0, err
    metrics = json.loads(out.read_text())["metrics"]
    rows = list(csv.DictReader(open(tmp_path / "res_predictions.csv")))
    assert len(rows) == sum(in9_size(v, c) for v in ("mixed_same", "mixed_rand") for c in IN9_CLASSES)
    acc = {v: np.mean([r["pred_zeroshot"] == r["y"] for r in rows if r["group"].endswith(f"_variant:{v}")])
           for v in ("mixed_same", "mixed_rand")}
    assert metrics["zeroshot/bg_gap"] == pytest.approx(acc["mixed_same"] - acc["mixed_rand"])


# -------------------------------------------------------------------- CounterAnimal
def test_counteranimal_common_and_counter_groups_in_imagenet_id_order(tmp_path):
    write_counteranimal(tmp_path)
    ds = counteranimal.load_counteranimal(DatasetRequest(str(tmp_path)))
    assert ds.splits() == ("test",)
    assert ds.classnames == ["leatherback turtle", "black grouse", "ice bear"]  # ids 34, 80, 296
    by_id = sorted(COUNTERANIMAL_FOLDERS.items(), key=lambda kv: int(kv[0].split()[0]))
    assert counts(ds, "test") == [n for _, (_, _, n_common, n_counter) in by_id for n in (n_common, n_counter)]
    row = next(r for r in ds.rows("test") if r.values == (2, 1))
    assert row.extra == {"imagenet_id": 296, "background_name": "grass"}


def test_counteranimal_refuses_a_class_without_counter_images(tmp_path):
    write_counteranimal(tmp_path)
    folder = tmp_path / "LAION-final" / "80 black grouse"
    for p in (folder / "counter-snow").iterdir():
        p.unlink()
    (folder / "counter-snow").rmdir()
    with pytest.raises(DatasetError, match="80 black grouse: expected common-<background>/ and counter-<background>/"):
        counteranimal.load_counteranimal(DatasetRequest(str(tmp_path)))


def test_counter_drop_is_common_minus_counter_accuracy():
    schema = counteranimal.two_field_schema(["a", "b"], counteranimal.KINDS, attribute_field="background")
    fields = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [1, 1]])
    pred = np.array([0, 1, 0, 0, 0])  # common 2/2, counter 1/3
    got = counteranimal.counter_drop(Predictions("m", "test", tuple("abcde"), pred, fields, schema))
    assert got["counter_drop"] == pytest.approx(1 - 1 / 3) and got["counter_drop/counter_acc"] == pytest.approx(1 / 3)


def test_eval_reads_the_readers_flags_and_reports_the_counter_drop(run_cli, spawrious_root, tmp_path, tiny_pretrained):
    root, sizes = spawrious_root
    tiny = ["--model", "crp-tiny", "--pretrained", tiny_pretrained, "--num_workers", "0", "--no_feature_cache", "--no_amp"]
    out = tmp_path / "spawrious.json"
    rc, _, err = run_cli("eval", "--dataset", "robust/spawrious", "--dataset_root", root, "--spawrious_benchmark",
                         "m2m_hard", "--spawrious_total", "10", *tiny, "--output", out)
    assert rc == 0, err
    dump = json.loads(out.read_text())
    assert dump["robust"]["dataset_source"]["options"] == {"benchmark": "m2m_hard", "total": 10}
    expected = expected_spawrious("m2m_hard", 10, sizes)["test"]
    names = [f"y:{c}_location:{loc}" for c in SPAWRIOUS_CLASSES for loc in SPAWRIOUS_LOCATIONS]
    assert [dump["metrics"][f"zeroshot/group_count/{n}"] for n in names] == expected
    write_counteranimal(tmp_path / "ca")
    out = tmp_path / "ca.json"
    rc, _, err = run_cli("eval", "--dataset", "robust/counteranimal", "--dataset_root", tmp_path / "ca", *tiny,
                         "--save_predictions", "--output", out)
    assert rc == 0, err
    metrics = json.loads(out.read_text())["metrics"]
    rows = list(csv.DictReader(open(tmp_path / "ca_predictions.csv")))
    acc = {k: np.mean([r["pred_zeroshot"] == r["y"] for r in rows if r["group"].endswith(f"background:{k}")])
           for k in ("common", "counter")}
    assert metrics["zeroshot/counter_drop"] == pytest.approx(acc["common"] - acc["counter"])
    with pytest.raises(SystemExit) as info:  # argparse's one-line usage error
        run_cli("eval", "--dataset", "robust/spawrious", "--dataset_root", root, "--spawrious_benchmark",
                "o2o_impossible", *tiny, "--output", tmp_path / "x.json")
    assert info.value.code == 2
