"""``robust/celeba``: CelebA from its original annotation files, or their CSV variants.

``--dataset_root`` holds either

- ``list_attr_celeba.txt`` (line 1: the image count; line 2: the 40 attribute names;
  then ``000001.jpg -1  1 ...``) and ``list_eval_partition.txt`` (``000001.jpg 0``), as
  published by Liu et al.; or
- ``list_attr_celeba.csv`` (``image_id`` + the 40 attribute columns) and
  ``list_eval_partition.csv`` (``image_id,partition``), the Kaggle copy group_DRO uses;

with the images in ``img_align_celeba/`` (the Kaggle copy's nested
``img_align_celeba/img_align_celeba/`` is found too).  Attribute values -1/1 become 0/1;
partition 0/1/2 = train/val/test.  The class ``y`` is ``--celeba_target_attribute``
(default ``Blond_Hair``) and the spurious attribute ``a`` is
``--celeba_spurious_attribute`` (default ``Male``), grouped ``g = y * 2 + a`` as in
group_DRO and DFR (train counts 71629/66874/22880/1387 for the defaults).

Default zero-shot prompts for ``Blond_Hair``: "A photo of a celebrity with {c}." with
``dark hair``/``blond hair`` -- the prompts of Zhang & Re, "Contrastive Adapters for
Foundation Model Group Robustness" (NeurIPS 2022), reused by Chuang et al., "Debiasing
Vision-Language Models via Biased Prompts" (2023; github.com/chingyaoc/debias_vl,
``discriminative/main.py``).  Other targets get generic prompts ("A photo of a
celebrity, smiling."); override them with ``--custom_classname_file`` /
``--custom_template_file`` (key ``robust/celeba`` or ``celeba``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..argtypes import option
from ..groups import two_field_schema
from ..hookspecs import hookimpl
from ..readers import SPLIT_CODES, FileDataset, FileRow, key_from_path, parse_int, read_csv, read_text, reader_config
from ..specs import DatasetRequest, DatasetSpec
from .base import DatasetError

NAME = "celeba"
DEFAULT_TARGET = "Blond_Hair"
DEFAULT_SPURIOUS = "Male"
IMAGE_DIR = "img_align_celeba"
ATTR_FILES = ("list_attr_celeba.txt", "list_attr_celeba.csv")
PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")
#: readable value names (index = 0/1 after mapping -1/1) for the usual attributes
VALUE_NAMES = {"Blond_Hair": ("not_blond", "blond"), "Male": ("female", "male")}
#: literature prompts per target attribute: (class names, templates)
PROMPTS = {"Blond_Hair": (("dark hair", "blond hair"), ("A photo of a celebrity with {c}.",))}
GENERIC_TEMPLATES = ("A photo of a celebrity, {c}.",)
CITATION = "Liu et al., Deep Learning Face Attributes in the Wild, ICCV 2015 (CelebA)"


def value_names(attribute: str) -> tuple[str, str]:
    return VALUE_NAMES.get(attribute, (f"not_{attribute.lower()}", attribute.lower()))


def _find(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: no {' or '.join(names)} (robust/{NAME} needs the CelebA annotation files)")


def _attr_value(text: str, where: str, column: str) -> int:
    value = parse_int(text, where, column, (-1, 1))
    return (value + 1) // 2


def read_attributes(path: Path, wanted: Sequence[str]) -> tuple[list[str], dict[str, tuple[tuple[int, ...], str]]]:
    """All attribute names and ``{image_id: (0/1 values of wanted, where)}`` from either format."""
    if path.suffix == ".csv":
        header, table = read_csv(path, ["image_id"])
        names = [c for c in header if c != "image_id"]
        _check_wanted(wanted, names)
        out = {}
        for line, cells in table:
            where = f"{path} line {line}"
            out[cells["image_id"].strip()] = (tuple(_attr_value(cells[a], where, a) for a in wanted), where)
        return names, out
    lines = read_text(path, "attribute file").splitlines()
    if len(lines) < 2:
        raise DatasetError(f"{path}: expected a count line and an attribute-name line")
    count = parse_int(lines[0], f"{path} line 1", "image count")
    names = lines[1].split()
    _check_wanted(wanted, names)
    index = [names.index(a) for a in wanted]
    out = {}
    for n, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        where = f"{path} line {n}"
        if len(parts) != len(names) + 1:
            raise DatasetError(f"{where}: {len(parts) - 1} attribute values, expected {len(names)}")
        out[parts[0]] = (tuple(_attr_value(parts[1 + i], where, a) for i, a in zip(index, wanted)), where)
    if len(out) != count:
        raise DatasetError(f"{path}: line 1 announces {count} images but the file lists {len(out)}")
    return names, out


def _check_wanted(wanted: Sequence[str], names: Sequence[str]) -> None:
    for flag, attribute in zip(("--celeba_target_attribute", "--celeba_spurious_attribute"), wanted):
        if attribute not in names:
            raise DatasetError(f"robust/{NAME}: unknown attribute {attribute!r} for {flag}; valid: {', '.join(names)}")


def read_partition(path: Path) -> dict[str, tuple[str, str]]:
    """``{image_id: (split name, where)}`` from either format."""
    out = {}
    if path.suffix == ".csv":
        _, table = read_csv(path, ["image_id", "partition"])
        items = [(f"{path} line {line}", cells["image_id"].strip(), cells["partition"]) for line, cells in table]
    else:
        items = []
        for n, line in enumerate(read_text(path, "partition file").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DatasetError(f"{path} line {n}: expected '<image> <partition>', got {line.strip()!r}")
            items.append((f"{path} line {n}", parts[0], parts[1]))
    for where, image_id, code in items:
        out[image_id] = (SPLIT_CODES[parse_int(code, where, "partition", tuple(SPLIT_CODES))], where)
    return out


@dataclass(frozen=True)
class CelebAConfig:
    """``--celeba_*`` flags."""

    target_attribute: str = option(DEFAULT_TARGET, "the attribute that is the class y", metavar="ATTR")
    spurious_attribute: str = option(DEFAULT_SPURIOUS, "the spurious attribute a", metavar="ATTR")


def load_celeba(request: DatasetRequest) -> FileDataset:
    root = Path(request.root)
    config = reader_config(request, CelebAConfig)
    target, spurious = config.target_attribute, config.spurious_attribute
    if target == spurious:
        raise DatasetError(f"robust/{NAME}: target and spurious attribute are both {target!r}")
    attr_path, partition_path = _find(root, ATTR_FILES), _find(root, PARTITION_FILES)
    _, attributes = read_attributes(attr_path, (target, spurious))
    partition = read_partition(partition_path)
    unassigned = sorted(set(attributes) - set(partition))
    if unassigned:
        raise DatasetError(f"{partition_path}: no partition for {len(unassigned)} image(s), e.g. {unassigned[0]!r}")
    unknown = sorted(set(partition) - set(attributes))
    if unknown:
        raise DatasetError(f"{attr_path}: no attributes for {len(unknown)} image(s) of {partition_path.name}, e.g. {unknown[0]!r}")
    image_dir = root / IMAGE_DIR
    if (image_dir / IMAGE_DIR).is_dir():  # the Kaggle copy nests the folder
        image_dir = image_dir / IMAGE_DIR
    rows: dict[str, list[FileRow]] = {split: [] for split in SPLIT_CODES.values()}
    for image_id, (values, where) in attributes.items():
        rows[partition[image_id][0]].append(FileRow(key_from_path(image_id), os.path.join(image_dir, image_id), values, {}, where))
    classnames, templates = PROMPTS.get(target, (tuple(v.replace("_", " ") for v in value_names(target)), GENERIC_TEMPLATES))
    return FileDataset(
        name=NAME,
        root=root,
        schema=two_field_schema(value_names(target), value_names(spurious)),
        classnames=classnames,
        templates=templates,
        rows=rows,
        metadata_files=[attr_path, partition_path],
        options={"target_attribute": target, "spurious_attribute": spurious, "image_dir": str(image_dir)},
    )


@hookimpl
def register_datasets(register) -> None:
    register(
        DatasetSpec(
            name=NAME,
            load=load_celeba,
            description="CelebA from list_attr_celeba/list_eval_partition (.txt or .csv); "
            f"y = --celeba_target_attribute (default {DEFAULT_TARGET}), a = --celeba_spurious_attribute (default {DEFAULT_SPURIOUS})",
            citation=CITATION,
            options=CelebAConfig,
            option_prefix="celeba_",
        )
    )

