"""``robust/imagenet9``: the Backgrounds Challenge's ImageNet-9 variants (Xiao et al., ICLR 2021).

Built only with the public reader kit.  ``--dataset_root`` is the released ``bg_challenge``
folder: ``{variant}/val/{NN_class}/*.JPEG`` (github.com/MadryLab/backgrounds_challenge).
Every variant found is a split; the split ``all`` holds every variant found, with the
variant as the group attribute, so one run on it gives per-variant (group) accuracies and
the ``bg_gap`` metric, acc(mixed_same) - acc(mixed_rand), the paper's BG-Gap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clip_robust_plugins import DatasetError, DatasetRequest, DatasetSpec, MetricSpec, hookimpl, two_field_schema
from clip_robust_plugins.readers import FileDataset, FileRow, key_from_path, list_images, subfolders

NAME = "imagenet9"
VARIANTS = ("original", "mixed_same", "mixed_rand", "mixed_next", "only_fg", "no_fg", "only_bg_b", "only_bg_t")
COMBINED_SPLIT = "all"
VARIANT_FIELD = "variant"
TEMPLATES = ("a photo of a {c}.",)
CITATION = "Xiao et al., Noise or Signal: The Role of Image Backgrounds in Object Recognition, ICLR 2021"


def class_folders(variant_dir: Path) -> list[str]:
    """The ``NN_name`` class folders of one variant, in label order (``NN``)."""
    names = subfolders(variant_dir)
    bad = [n for n in names if not (n[:2].isdigit() and n[2:3] == "_")]
    if bad:
        raise DatasetError(f"{variant_dir / bad[0]}: not a class folder of the form NN_name (e.g. 00_dog)")
    if [int(n[:2]) for n in names] != list(range(len(names))):
        raise DatasetError(f"{variant_dir}: class folders {names} are not numbered 00, 01, ... without gaps")
    return names


def load_imagenet9(request: DatasetRequest) -> FileDataset:
    root = Path(request.root)
    found = [v for v in VARIANTS if (root / v / "val").is_dir()]
    if not found:
        raise DatasetError(f"{root}: no ImageNet-9 variant folders ({'/val/, '.join(VARIANTS[:3])}/val/, ...)")
    classes = class_folders(root / found[0] / "val")
    rows: dict[str, list[FileRow]] = {}
    for v, variant in enumerate(VARIANTS):
        if variant not in found:
            continue
        val = root / variant / "val"
        if class_folders(val) != classes:
            raise DatasetError(f"{val}: class folders {class_folders(val)} differ from {root / found[0] / 'val'}'s")
        for y, cls in enumerate(classes):
            names = list_images(val / cls)
            if not names:
                raise DatasetError(f"{val / cls}: no images")
            for name in names:
                rel = f"{variant}/{cls}/{name}"
                row = FileRow(key_from_path(rel), os.path.join(val, cls, name), (y, v), {}, f"{val / cls} {name}")
                rows.setdefault(variant, []).append(row)
                rows.setdefault(COMBINED_SPLIT, []).append(row)
    return FileDataset(
        name=NAME, root=root, schema=two_field_schema(classes, VARIANTS, attribute_field=VARIANT_FIELD),
        classnames=[c[3:].replace("_", " ") for c in classes], templates=TEMPLATES, rows=rows,
        options={"variants": found},
    )


def bg_gap(preds) -> dict[str, float]:
    """acc(mixed_same) - acc(mixed_rand) on a split holding both variants ({} otherwise)."""
    schema = preds.schema
    if VARIANT_FIELD not in schema.field_names or schema.field(VARIANT_FIELD).values != VARIANTS:
        return {}
    variant = np.asarray(preds.fields)[:, schema.field_names.index(VARIANT_FIELD)]
    correct = np.asarray(preds.pred) == np.asarray(preds.y)
    same, rand = variant == VARIANTS.index("mixed_same"), variant == VARIANTS.index("mixed_rand")
    if not same.any() or not rand.any():
        return {}
    acc_same, acc_rand = float(correct[same].mean()), float(correct[rand].mean())
    return {"bg_gap": acc_same - acc_rand, "bg_gap/mixed_same_acc": acc_same, "bg_gap/mixed_rand_acc": acc_rand}


@hookimpl
def register_datasets(register) -> None:
    register(DatasetSpec(
        name=NAME, load=load_imagenet9, citation=CITATION,
        description="ImageNet-9 backgrounds challenge: one split per variant ({variant}/val/{NN_class}/) and "
                    f"'{COMBINED_SPLIT}' (every variant, the variant as group attribute: BG-gap)",
    ))


@hookimpl
def register_metrics(register) -> None:
    register(MetricSpec(
        name="bg_gap", compute=bg_gap,
        description="robust/imagenet9 split 'all': accuracy on mixed_same minus accuracy on mixed_rand (BG-Gap)",
    ))
