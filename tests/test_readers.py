"""The readers of published formats: group counts per split, order, options and errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from clip_robust_plugins.datasets.bad_samples import SkippedSample
from clip_robust_plugins.datasets.base import DatasetError
from clip_robust_plugins.datasets.celeba import CelebAConfig, load_celeba
from clip_robust_plugins.datasets.files import key_from_path
from clip_robust_plugins.datasets.imagefolder import load_imagefolder
from clip_robust_plugins.datasets.subpop import SubpopConfig, load_subpop
from clip_robust_plugins.datasets.waterbirds import WaterbirdsConfig, load_waterbirds
from clip_robust_plugins.specs import DatasetRequest
from fixture_formats import (
    CELEBA_ATTRIBUTES,
    CELEBA_COUNTS,
    FOLDER_COUNTS,
    SUBPOP_ATTRIBUTES,
    SUBPOP_CLASSES,
    SUBPOP_COUNTS,
    WATERBIRDS_COUNTS,
    write_celeba,
    write_imagefolder,
    write_subpop,
    write_waterbirds,
)


def request(root: Path, config=None) -> DatasetRequest:
    return DatasetRequest(root=str(root), config=config)


def counts(ds) -> dict[str, list[int]]:
    return {split: [int(c) for c in ds.schema.counts(split)] for split in ds.splits()}


def read_back(ds, split: str) -> list[tuple[str, list[int]]]:
    """Every sample of ``split`` through ``samples()`` (decoded images, field tensors)."""
    data = ds.samples(split, None)
    out = []
    for i in range(len(data)):
        key, image, fields = data[i]
        assert image.size == (8, 8) or image.size == (32, 32)
        assert fields.dtype == torch.int64
        out.append((key, fields.tolist()))
    return out


# ----------------------------------------------------------------------- Waterbirds
def test_waterbirds_metadata_csv_gives_the_written_group_counts(tmp_path):
    rows = write_waterbirds(tmp_path / "a", seed=0)
    ds = load_waterbirds(request(tmp_path / "a"))
    assert ds.splits() == ("train", "val", "test")
    assert counts(ds) == WATERBIRDS_COUNTS
    assert ds.schema.group_names() == ["y:landbird_a:land", "y:landbird_a:water", "y:waterbird_a:land", "y:waterbird_a:water"]
    assert ds.classnames == ["landbird", "waterbird"] and ds.templates == ["This is a picture of a {c}."]
    # every row arrives with its own labels, under a key derived from its file name
    expected = {key_from_path(r["img_filename"]): [int(r["y"]), int(r["place"])] for r in rows if r["split"] == "2"}
    got = read_back(ds, "test")
    assert dict(got) == expected and [k for k, _ in got] == sorted(expected)
    assert all("." not in k and "/" not in k for k in expected)
    # another row order in metadata.csv and another file creation order: the same samples, same order
    write_waterbirds(tmp_path / "b", seed=1)
    other = load_waterbirds(request(tmp_path / "b"))
    assert [r.key for r in other.rows("train")] == [r.key for r in ds.rows("train")]
    assert [r.values for r in other.rows("train")] == [r.values for r in ds.rows("train")]


def test_waterbirds_bad_inputs_are_one_line_errors_naming_the_file(tmp_path):
    root = tmp_path / "wb"
    rows = write_waterbirds(root, columns=["img_id", "img_filename", "y", "split", "place_filename"])
    with pytest.raises(DatasetError, match=r"metadata\.csv: missing column\(s\) \['place'\]"):
        load_waterbirds(request(root))
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:3] + [{**rows[3], "y": "2"}])
    with pytest.raises(DatasetError, match=r"metadata\.csv line 5: column 'y': value 2 is out of range"):
        load_waterbirds(request(root))
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + [{**rows[0], "img_id": "99"}])
    with pytest.raises(DatasetError, match="duplicate sample key"):
        load_waterbirds(request(root))
    with pytest.raises(DatasetError, match="metadata file not found"):
        load_waterbirds(request(tmp_path / "nowhere"))
    # a missing image is found before any model runs (fingerprint), an undecodable one when read
    write_waterbirds(root := tmp_path / "wb2")
    ds = load_waterbirds(request(root))
    first = ds.rows("val")[0]
    Path(first.path).unlink()
    with pytest.raises(DatasetError, match=f"{first.path}: image file not found"):
        ds.fingerprint("val")
    broken = ds.rows("test")[1]
    Path(broken.path).write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=f"{broken.path}: unreadable image"):
        ds.samples("test", None)[1]
    # what the extractor reads: the bad image as a SkippedSample (it raises the reason, or skips on request)
    item = ds.ordered_samples("test", None)[1]
    assert isinstance(item, SkippedSample) and item.key == broken.key and item.fields == broken.values
    assert item.reason.startswith(f"{broken.path}: unreadable image") and item.order.tolist() == [0, 1]
    order, key, _, fields = ds.ordered_samples("test", None, rank=0, world_size=2)[1]  # rank 0 of 2: rows 0, 2, ...
    row = ds.rows("test")[2]
    assert order.tolist() == [0, 2] and key == row.key and fields.tolist() == list(row.values)


def test_waterbirds_metadata_flag_and_custom_path(tmp_path):
    root = tmp_path / "wb"
    write_waterbirds(root)
    (root / "metadata.csv").rename(root / "meta_other.csv")
    ds = load_waterbirds(request(root, WaterbirdsConfig(metadata="meta_other.csv")))
    assert counts(ds) == WATERBIRDS_COUNTS


# --------------------------------------------------------------------------- CelebA
@pytest.mark.parametrize("variant,nested", [("txt", False), ("csv", True)])
def test_celeba_original_txt_and_csv_variants_give_the_written_counts(tmp_path, variant, nested):
    table = write_celeba(tmp_path, variant, nested=nested)
    ds = load_celeba(request(tmp_path))
    assert counts(ds) == CELEBA_COUNTS  # Blond_Hair x Male by default
    assert ds.schema.group_names() == [
        "y:not_blond_a:female", "y:not_blond_a:male", "y:blond_a:female", "y:blond_a:male"
    ]
    assert ds.classnames == ["dark hair", "blond hair"]
    keys = [k for k, _ in read_back(ds, "val")]
    assert keys == sorted(i[:-4] for i, (split, _) in table.items() if split == "val")
    # any other pair of attributes, -1/1 mapped to 0/1, counted from the fixture's own table
    ds2 = load_celeba(request(tmp_path, CelebAConfig(target_attribute="Smiling", spurious_attribute="Young")))
    for split in ("train", "val", "test"):
        expected = [0] * 4
        for s, values in table.values():
            if s == split:
                expected[(values["Smiling"] + 1) // 2 * 2 + (values["Young"] + 1) // 2] += 1
        assert list(ds2.schema.counts(split)) == expected
    assert ds2.schema.group_names()[0] == "y:not_smiling_a:not_young"


def test_celeba_errors_list_valid_attributes_and_name_the_line(tmp_path):
    write_celeba(tmp_path, "txt")
    with pytest.raises(DatasetError, match="unknown attribute 'Blonde' for --celeba_target_attribute; valid: 5_o_Clock_Shadow, "):
        load_celeba(request(tmp_path, CelebAConfig(target_attribute="Blonde")))
    lines = (tmp_path / "list_attr_celeba.txt").read_text().splitlines()
    parts = lines[4].split()
    parts[1 + CELEBA_ATTRIBUTES.index("Male")] = "0"  # neither -1 nor 1
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join([*lines[:4], " ".join(parts), *lines[5:]]) + "\n")
    with pytest.raises(DatasetError, match=r"list_attr_celeba\.txt line 5: column 'Male': value 0 is out of range"):
        load_celeba(request(tmp_path))
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines[:-1]) + "\n")  # one image fewer than announced
    with pytest.raises(DatasetError, match=r"line 1 announces \d+ images but the file lists"):
        load_celeba(request(tmp_path))
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetError, match="no list_eval_partition.txt or list_eval_partition.csv"):
        load_celeba(request(tmp_path))


# ----------------------------------------------------------------------- SubpopBench
def test_subpop_metadata_with_sidecar_names_gives_the_written_counts(tmp_path):
    rows = write_subpop(tmp_path)
    ds = load_subpop(request(tmp_path))
    assert counts(ds) == SUBPOP_COUNTS  # the empty train group is counted as 0
    assert ds.schema.group_names()[:2] == [f"y:cat_a:{SUBPOP_ATTRIBUTES[0]}", f"y:cat_a:{SUBPOP_ATTRIBUTES[1]}"]
    assert ds.classnames == SUBPOP_CLASSES
    got = dict(read_back(ds, "train"))
    assert got == {key_from_path(r["filename"]): [int(r["y"]), int(r["a"])] for r in rows if r["split"] == "0"}
    # names from the flags win over the sidecar
    flagged = load_subpop(request(tmp_path, SubpopConfig(classnames=("kitten", "puppy", "chick"), attributes=("in", "out"))))
    assert flagged.classnames == ["kitten", "puppy", "chick"] and flagged.schema.group_names()[1] == "y:kitten_a:out"
    assert counts(flagged) == SUBPOP_COUNTS


def test_subpop_needs_class_names_and_checks_labels(tmp_path):
    rows = write_subpop(tmp_path, sidecar=False)
    with pytest.raises(DatasetError, match="no class names .* --subpop_classnames"):
        load_subpop(request(tmp_path))
    with pytest.raises(DatasetError, match=r"metadata\.csv line \d+: column 'y': value 2 is out of range"):
        load_subpop(request(tmp_path, SubpopConfig(classnames=("cat", "dog"))))
    ds = load_subpop(request(tmp_path, SubpopConfig(classnames=tuple(SUBPOP_CLASSES))))
    assert ds.schema.field("a").values == ("a0", "a1")  # attribute names default to their codes
    with open(tmp_path / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["filename", "y", "split"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['a'\]"):
        load_subpop(request(tmp_path, SubpopConfig(classnames=tuple(SUBPOP_CLASSES))))


# ----------------------------------------------------------------------- image folders
def test_imagefolder_tree_gives_the_written_counts_in_sorted_order(tmp_path):
    write_imagefolder(tmp_path / "a", seed=0)
    ds = load_imagefolder(request(tmp_path / "a"))
    assert ds.splits() == ("train", "val", "test")  # SpuCo's "valid" is the val split
    classes, attrs = ["diamond", "square"], ["land", "water"]
    assert ds.schema.group_names() == [f"y:{c}_a:{a}" for c in classes for a in attrs]
    for folder, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        assert counts(ds)[split] == [FOLDER_COUNTS[folder][(c, a)] for c in classes for a in attrs]
    keys = [k for k, _ in read_back(ds, "test")]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    write_imagefolder(tmp_path / "b", seed=5)  # other creation order, other pixels
    other = load_imagefolder(request(tmp_path / "b"))
    assert [r.key for r in other.rows("train")] == [r.key for r in ds.rows("train")]
    (tmp_path / "a" / "test" / "square" / "stray.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="stray.png: image at the wrong depth"):
        load_imagefolder(request(tmp_path / "a"))


def test_reader_evaluates_end_to_end_with_custom_names(run_cli, tmp_path, tiny_pretrained):
    root = tmp_path / "folders"
    write_imagefolder(root)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"robust/imagefolder": ["diamond", "square"]}))
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"imagefolder": ["a {c} shape.", "a photo of a {c}."]}))
    out = tmp_path / "res.json"
    rc, stdout, err = run_cli(
        "eval", "--dataset", "robust/imagefolder", "--dataset_root", root, "--model", "crp-tiny",
        "--pretrained", tiny_pretrained, "--num_workers", "0", "--no_feature_cache", "--no_amp",
        "--mitigation", "erm_head", "--custom_classname_file", names, "--custom_template_file", templates,
        "--dump_classnames", "--dump_templates", "--save_predictions", "--output", out,
    )
    assert rc == 0, err
    dump = json.loads(out.read_text())
    assert dump["classnames"] == ["diamond", "square"] and dump["templates"] == ["a {c} shape.", "a photo of a {c}."]
    metrics = dump["metrics"]
    for (cls, attr), n in FOLDER_COUNTS["test"].items():
        assert metrics[f"zeroshot/group_count/y:{cls}_a:{attr}"] == n
    rows = list(csv.DictReader(open(tmp_path / "res_predictions.csv")))
    assert len(rows) == sum(FOLDER_COUNTS["test"].values())
    assert metrics["zeroshot/acc"] == sum(r["pred_zeroshot"] == r["y"] for r in rows) / len(rows)
    assert dump["robust"]["dataset_source"]["reader"] == "imagefolder"
    # the custom names reached the zero-shot head: other names give other predictions
    names.write_text(json.dumps({"imagefolder": ["square", "diamond"]}))  # swapped on purpose
    rc, _, err = run_cli(
        "eval", "--dataset", "robust/imagefolder", "--dataset_root", root, "--model", "crp-tiny",
        "--pretrained", tiny_pretrained, "--num_workers", "0", "--no_feature_cache", "--no_amp",
        "--custom_classname_file", names, "--output", tmp_path / "swapped.json",
    )
    assert rc == 0, err
    swapped = json.loads((tmp_path / "swapped.json").read_text())["metrics"]
    assert swapped["zeroshot/acc"] == pytest.approx(1.0 - metrics["zeroshot/acc"], abs=1e-12)


def test_readers_are_registered_with_their_flags(run_cli):
    rc, stdout, _ = run_cli("plugins", "--json")
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(stdout)}
    for name in ("waterbirds", "celeba", "subpop", "imagefolder"):
        row = rows[f"clip_robust_plugins.datasets.{name}"]
        assert row["registers"]["datasets"] == [f"robust/{name}"]
        assert "add_arguments" not in row["hooks"]  # flags from DatasetSpec(options=...), one config idiom


# ------------------------------------------------------------ annotations, base class
def test_every_dataset_tells_its_annotations_through_the_base_class(tmp_path, shapes_root):
    import shutil

    from clip_robust_plugins.datasets.base import RobustDataset
    from clip_robust_plugins.datasets.wds import ANNOTATIONS_KEY, GroupedShards
    from clip_robust_plugins.readers import FileDataset, FileRow

    assert RobustDataset.sample_annotations(None, "test") is None and RobustDataset.file_rows(None, "test") is None
    write_waterbirds(tmp_path / "wb")
    wb = load_waterbirds(request(tmp_path / "wb"))
    record = wb.sample_annotations("test")
    n = sum(WATERBIRDS_COUNTS["test"])
    assert record["mask"] is False and record["box"] is False and record["samples"] == n
    assert record["json_keys"]["y"] == n and record["json_keys"]["img_id"] == n
    assert wb.file_rows("test") == wb.rows("test")
    rows = [FileRow(r.key, r.path, r.values, {**r.extra, "box": [0, 0, 4, 4]}, r.where) for r in wb.rows("test")]
    boxed = FileDataset(name="boxed", root=wb.root, schema=wb.schema, classnames=wb.classnames,
                        templates=wb.templates, rows={"test": rows})
    assert boxed.sample_annotations("test")["box"] is True
    from clip_robust_plugins.mitigations.seraser import resolve_views

    assert resolve_views("auto", boxed, "robust/boxed", "test").name == "boxes"  # a third-party reader is known
    # shards written elsewhere, without the annotations record: read from the tar headers, the same answer
    copy = tmp_path / "copy"
    shutil.copytree(shapes_root, copy)
    doc = json.loads((copy / "groups.json").read_text())
    assert doc.pop(ANNOTATIONS_KEY)
    (copy / "groups.json").write_text(json.dumps(doc))
    assert GroupedShards(copy).sample_annotations("test") == GroupedShards(shapes_root).sample_annotations("test")
