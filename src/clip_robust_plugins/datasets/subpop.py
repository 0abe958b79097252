"""``robust/subpop``: any dataset described by a SubpopBench-style ``metadata.csv``.

SubpopBench (Yang et al., ICML 2023) ships one table per dataset with the columns
``filename,y,a,split``: integer class ``y``, integer spurious attribute ``a``, ``split``
0/1/2 = train/val/test (or a split name, as its ImageNetBG table has); ``filename`` is
joined to the image root as SubpopBench does (``os.path.join``), so absolute paths stay
absolute.  This covers MetaShift, CheXpert, ImageNetBG, NICO++, Living17 and more.
Groups ``g = y * n_a + a``, SubpopBench's own convention.

``--dataset_root`` is the image root; ``--subpop_metadata`` the table (default
``metadata.csv``, relative to the root unless absolute).  The integer codes need names:

- ``--subpop_classnames NAME ...`` / ``--subpop_attributes NAME ...`` (index = code), or
- a sidecar JSON beside the table, ``<table stem>.names.json`` (or ``--subpop_names FILE``):
  ``{"classnames": [...], "attributes": [...], "templates": ["a photo of a {c}.", ...]}``.

Flags win over the sidecar.  Class names are required (they are the zero-shot prompts);
attribute names default to ``a0, a1, ...`` over the codes present.  The default
template is CLIP's basic prompt "a photo of a {c}." (Radford et al., 2021).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..argtypes import option
from ..groups import two_field_schema
from ..hookspecs import hookimpl
from ..readers import FileDataset, FileRow, key_from_path, parse_int, read_csv, reader_config, resolve_under, split_name
from ..specs import DatasetRequest, DatasetSpec
from .base import DatasetError

NAME = "subpop"
DEFAULT_METADATA = "metadata.csv"
REQUIRED_COLUMNS = ("filename", "y", "a", "split")
TEMPLATES = ("a photo of a {c}.",)
SIDECAR_SUFFIX = ".names.json"
CITATION = "Yang et al., Change is Hard: A Closer Look at Subpopulation Shift, ICML 2023 (SubpopBench)"


@dataclass(frozen=True)
class SubpopConfig:
    """``--subpop_*`` flags."""

    metadata: str = option(DEFAULT_METADATA, "the filename,y,a,split table, relative to --dataset_root unless absolute",
                           metavar="FILE")
    classnames: tuple[str, ...] = option((), "class names in label order (y = 0, 1, ...); also the zero-shot prompts "
                                         "(default: from the names file)", metavar="NAME")
    attributes: tuple[str, ...] = option((), "spurious-attribute names in code order (a = 0, 1, ...; default: from "
                                         "the names file, else a0, a1, ...)", metavar="NAME")
    names: str | None = option(None, f"JSON with classnames/attributes/templates (default: <metadata stem>"
                               f"{SIDECAR_SUFFIX} beside the table, when present)", type=str, metavar="FILE")


def sidecar_path(metadata: Path) -> Path:
    return metadata.with_name(metadata.stem + SIDECAR_SUFFIX)


def _read_sidecar(path: Path, explicit: bool) -> dict:
    if not path.is_file():
        if explicit:
            raise DatasetError(f"{path}: names file not found (--subpop_names)")
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'classnames', 'attributes', 'templates'")
    for key in ("classnames", "attributes", "templates"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise DatasetError(f"{path}: {key!r} must be a list of strings")
    return doc


def load_subpop(request: DatasetRequest) -> FileDataset:
    config = reader_config(request, SubpopConfig)
    root = Path(request.root)
    metadata = resolve_under(root, config.metadata)
    names_flag = config.names
    names_path = resolve_under(root, names_flag) if names_flag else sidecar_path(metadata)
    sidecar = _read_sidecar(names_path, explicit=bool(names_flag))
    classnames = list(config.classnames or sidecar.get("classnames") or [])
    if not classnames:
        raise DatasetError(
            f"robust/{NAME}: no class names for {metadata}; pass --subpop_classnames NAME ... or write "
            f'{names_path} ({{"classnames": [...], "attributes": [...]}})'
        )
    attributes = list(config.attributes or sidecar.get("attributes") or [])
    templates = list(sidecar.get("templates") or TEMPLATES)

    _, table = read_csv(metadata, REQUIRED_COLUMNS)
    parsed = []
    for line, cells in table:
        where = f"{metadata} line {line}"
        filename = cells["filename"].strip()
        if not filename:
            raise DatasetError(f"{where}: column 'filename' is empty")
        y = parse_int(cells["y"], where, "y", range(len(classnames)))
        a = parse_int(cells["a"], where, "a", range(len(attributes)) if attributes else None)
        if a < 0:
            raise DatasetError(f"{where}: column 'a': value {a} is negative")
        parsed.append((split_name(cells["split"], where), filename, y, a, where))
    if not attributes:
        attributes = [f"a{i}" for i in range(max((p[3] for p in parsed), default=0) + 1)]
    rows: dict[str, list[FileRow]] = {}
    for split, filename, y, a, where in parsed:
        rows.setdefault(split, []).append(FileRow(key_from_path(filename), os.path.join(root, filename), (y, a), {}, where))
    return FileDataset(
        name=NAME,
        root=root,
        schema=two_field_schema(classnames, attributes),
        classnames=classnames,
        templates=templates,
        rows=rows,
        metadata_files=[metadata] + ([names_path] if names_path.is_file() else []),
        options={"metadata": str(metadata), "classnames": classnames, "attributes": attributes},
    )


@hookimpl
def register_datasets(register) -> None:
    register(
        DatasetSpec(
            name=NAME,
            load=load_subpop,
            description="SubpopBench-style metadata.csv (filename,y,a,split): MetaShift, CheXpert, ImageNetBG, NICO++, ...",
            citation=CITATION,
            options=SubpopConfig,
            option_prefix="subpop_",
        )
    )

