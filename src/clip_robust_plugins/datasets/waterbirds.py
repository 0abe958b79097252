"""``robust/waterbirds``: Waterbirds as group_DRO published it (also the DFR and WILDS copy).

``--dataset_root`` is the release folder (``waterbird_complete95_forest2water2``) holding
``metadata.csv`` with the columns ``img_id,img_filename,y,split,place,place_filename``:
``y`` 0 landbird / 1 waterbird, ``place`` 0 land / 1 water, ``split`` 0/1/2 =
train/val/test, ``img_filename`` relative to the folder.  Groups ``g = y * 2 + place``
(group_DRO's convention); the release has train 3498/184/56/1057, val 467/466/133/133,
test 2255/2255/642/642.

Default zero-shot prompts: the class names ``landbird``/``waterbird`` in the template
"This is a picture of a {c}." -- the prompts of Zhang & Re, "Contrastive Adapters for
Foundation Model Group Robustness" (NeurIPS 2022), reused by Chuang et al., "Debiasing
Vision-Language Models via Biased Prompts" (2023; github.com/chingyaoc/debias_vl,
``discriminative/main.py``).  Override them with ``--custom_classname_file`` /
``--custom_template_file`` (key ``robust/waterbirds`` or ``waterbirds``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..argtypes import option
from ..groups import two_field_schema
from ..hookspecs import hookimpl
from ..readers import (
    SPLIT_CODES,
    FileDataset,
    FileRow,
    key_from_path,
    parse_int,
    read_csv,
    reader_config,
    resolve_under,
)
from ..specs import DatasetRequest, DatasetSpec
from .base import DatasetError

NAME = "waterbirds"
CLASS_VALUES = ("landbird", "waterbird")
PLACE_VALUES = ("land", "water")
CLASSNAMES = ("landbird", "waterbird")
TEMPLATES = ("This is a picture of a {c}.",)
DEFAULT_METADATA = "metadata.csv"
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")
CITATION = (
    "Sagawa et al., Distributionally Robust Neural Networks for Group Shifts, ICLR 2020 "
    "(Waterbirds: CUB-200-2011 birds on Places backgrounds)"
)


@dataclass(frozen=True)
class WaterbirdsConfig:
    """``--waterbirds_*`` flags."""

    metadata: str = option(DEFAULT_METADATA, "the metadata CSV, relative to --dataset_root unless absolute",
                           metavar="FILE")


def load_waterbirds(request: DatasetRequest) -> FileDataset:
    root = Path(request.root)
    metadata = resolve_under(root, reader_config(request, WaterbirdsConfig).metadata)
    header, table = read_csv(metadata, REQUIRED_COLUMNS)
    rows: dict[str, list[FileRow]] = {split: [] for split in SPLIT_CODES.values()}
    for line, cells in table:
        where = f"{metadata} line {line}"
        filename = cells["img_filename"].strip()
        if not filename:
            raise DatasetError(f"{where}: column 'img_filename' is empty")
        y = parse_int(cells["y"], where, "y", range(len(CLASS_VALUES)))
        place = parse_int(cells["place"], where, "place", range(len(PLACE_VALUES)))
        split = SPLIT_CODES[parse_int(cells["split"], where, "split", tuple(SPLIT_CODES))]
        extra = {c: cells[c].strip() for c in ("img_id", "place_filename") if c in header}
        rows[split].append(FileRow(key_from_path(filename), os.path.join(root, filename), (y, place), extra, where))
    return FileDataset(
        name=NAME,
        root=root,
        schema=two_field_schema(CLASS_VALUES, PLACE_VALUES),
        classnames=CLASSNAMES,
        templates=TEMPLATES,
        rows=rows,
        metadata_files=[metadata],
        options={"metadata": str(metadata)},
    )


@hookimpl
def register_datasets(register) -> None:
    register(
        DatasetSpec(
            name=NAME,
            load=load_waterbirds,
            description="Waterbirds from group_DRO's metadata.csv (y: landbird/waterbird, a: land/water place)",
            citation=CITATION,
            options=WaterbirdsConfig,
            option_prefix="waterbirds_",
        )
    )

