"""``robust/example_photos``: photos listed in a CSV file, a reader built with the public kit."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import clip_robust_plugins as crp

CLASSES = ("cat", "dog")
PLACES = ("indoor", "outdoor")


@dataclass(frozen=True)
class PhotosConfig:
    table: str = crp.option("photos.csv", "the CSV (file,class,place,split), relative to --dataset_root", metavar="FILE")


def code(cells: dict, column: str, names: tuple, where: str) -> int:
    text = cells[column].strip()
    if text not in names:
        raise crp.DatasetError(f"{where}: column {column!r}: {text!r} is not one of {list(names)}")
    return names.index(text)


def load(request: crp.DatasetRequest) -> crp.FileDataset:
    root = Path(request.root)
    table = crp.resolve_under(root, crp.reader_config(request, PhotosConfig).table)
    rows: dict[str, list] = {}
    for line, cells in crp.read_csv(table, ("file", "class", "place", "split"))[1]:
        where = f"{table} line {line}"
        values = (code(cells, "class", CLASSES, where), code(cells, "place", PLACES, where))
        file = cells["file"].strip()
        row = crp.FileRow(crp.key_from_path(file), os.path.join(root, file), values, where=where)
        rows.setdefault(crp.split_name(cells["split"], where), []).append(row)
    schema = crp.two_field_schema(CLASSES, PLACES)
    return crp.FileDataset(name="example_photos", root=root, schema=schema, classnames=CLASSES,
                           templates=("a photo of a {c}.",), rows=rows, metadata_files=[table])


SPEC = crp.DatasetSpec(name="example_photos", load=load, description="photos listed in file,class,place,split CSV",
                       options=PhotosConfig, option_prefix="photos_")
