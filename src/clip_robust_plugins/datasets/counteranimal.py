"""``robust/counteranimal``: CounterAnimal (Wang et al., NeurIPS 2024), common vs counter backgrounds.

Built only with the public reader kit.  Assumed release layout (see ``docs/datasets.md``):
``LAION-final/{imagenet id} {class name}/{common|counter}-{background}/*.jpg``; one split
``test``; the background kind (common / counter) is the group attribute, the background's
name is kept per sample (``extra["background_name"]``).  ``counter_drop`` is the paper's
headline number: accuracy on common minus accuracy on counter backgrounds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_robust_plugins import (
    DatasetError,
    DatasetRequest,
    DatasetSpec,
    MetricSpec,
    hookimpl,
    option,
    two_field_schema,
)
from clip_robust_plugins.readers import FileDataset, FileRow, key_from_path, list_images, reader_config, subfolders

NAME = "counteranimal"
KINDS = ("common", "counter")
KIND_FIELD = "background"
SPLIT = "test"
TEMPLATES = ("a photo of a {c}.",)
CITATION = "Wang et al., A Sober Look at the Robustness of CLIPs to Spurious Features, NeurIPS 2024 (CounterAnimal)"


@dataclass(frozen=True)
class CounterAnimalConfig:
    """``--counteranimal_*`` flags."""

    subset: str = option("LAION-final", "the release's subset folder under --dataset_root (LAION-final or "
                         "CLIP-final); ignored when --dataset_root is that folder itself", metavar="DIR")


def parse_class_folder(path: Path) -> tuple[int, str]:
    """``'34 leatherback turtle'`` -> (34, 'leatherback turtle')."""
    head, _, name = path.name.partition(" ")
    if not head.isdigit() or not name.strip():
        raise DatasetError(f"{path}: not a class folder of the form '<imagenet id> <class name>'")
    return int(head), name.strip()


def load_counteranimal(request: DatasetRequest) -> FileDataset:
    config = reader_config(request, CounterAnimalConfig)
    root = Path(request.root)
    base = root / config.subset if (root / config.subset).is_dir() else root
    folders = sorted((parse_class_folder(base / n), n) for n in subfolders(base))
    if not folders:
        raise DatasetError(f"{base}: no class folders ('<imagenet id> <class name>/common-*/, counter-*/')")
    rows = []
    for y, ((imagenet_id, _), folder) in enumerate(folders):
        kinds = {k: [s for s in subfolders(base / folder) if s.startswith(f"{k}-")] for k in KINDS}
        other = sorted(set(subfolders(base / folder)) - {s for v in kinds.values() for s in v})
        if other or not all(kinds.values()):
            raise DatasetError(f"{base / folder}: expected common-<background>/ and counter-<background>/ folders, "
                               f"found {subfolders(base / folder)}")
        for a, kind in enumerate(KINDS):
            for sub in kinds[kind]:
                for name in list_images(base / folder / sub):
                    rel = f"{folder}/{sub}/{name}"
                    extra = {"imagenet_id": imagenet_id, "background_name": sub.partition("-")[2]}
                    rows.append(FileRow(key_from_path(rel), os.path.join(base, rel), (y, a), extra, f"{base} {rel}"))
    names = [name for (_, name), _ in folders]
    return FileDataset(
        name=NAME, root=base, schema=two_field_schema([n.replace(" ", "_") for n in names], KINDS,
                                                     attribute_field=KIND_FIELD),
        classnames=names, templates=TEMPLATES, rows={SPLIT: rows}, options={"subset": base.name},
    )


def counter_drop(preds) -> dict[str, float]:
    """acc(common) - acc(counter) ({} for data without a common/counter background field)."""
    schema = preds.schema
    if KIND_FIELD not in schema.field_names or schema.field(KIND_FIELD).values != KINDS:
        return {}
    kind = np.asarray(preds.fields)[:, schema.field_names.index(KIND_FIELD)]
    correct = np.asarray(preds.pred) == np.asarray(preds.y)
    if not (kind == 0).any() or not (kind == 1).any():
        return {}
    common, counter = float(correct[kind == 0].mean()), float(correct[kind == 1].mean())
    return {"counter_drop": common - counter, "counter_drop/common_acc": common, "counter_drop/counter_acc": counter}


@hookimpl
def register_datasets(register) -> None:
    register(DatasetSpec(
        name=NAME, load=load_counteranimal, citation=CITATION, options=CounterAnimalConfig,
        option_prefix="counteranimal_",
        description="CounterAnimal: '<id> <class>/{common,counter}-<background>/' folders; group attribute common/counter",
    ))


@hookimpl
def register_metrics(register) -> None:
    register(MetricSpec(
        name="counter_drop", compute=counter_drop,
        description="robust/counteranimal: accuracy on common minus accuracy on counter backgrounds",
    ))
