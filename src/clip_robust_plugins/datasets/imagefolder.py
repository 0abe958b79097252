"""``robust/imagefolder``: images in ``split/class/attribute/*`` folders (the SpuCoAnimals layout).

``--dataset_root`` holds one folder per split (``train``, ``val``, ``test``; SpuCo's
``valid`` and ``validation`` are read as ``val``), each with one folder per class, each
with one folder per value of the spurious attribute, holding the images::

    root/train/landbirds/land/0001.jpg
    root/train/landbirds/water/0002.jpg
    root/test/small_dog_breeds/indoors/...

Class and attribute values are the folder names of all splits together, sorted by name
(never ``os.listdir`` order), so every split shares one schema; a class whose images
use only some attribute folders (SpuCoAnimals: birds on land/water, dogs
indoors/outdoors) has empty groups, reported with count 0 and left out of the worst
group.  Groups ``g = y * n_a + a``.  Files whose extension is not an image extension
(``--imagefolder_extensions``) and hidden entries are ignored; an image anywhere but at
depth three is an error.

Default zero-shot prompts: class folder names with ``_`` read as spaces in CLIP's basic
template "a photo of a {c}." (Radford et al., 2021); override them with
``--custom_classname_file`` / ``--custom_template_file``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..argtypes import option
from ..groups import two_field_schema
from ..hookspecs import hookimpl
from ..readers import FileDataset, FileRow, key_from_path, reader_config
from ..specs import DatasetRequest, DatasetSpec
from .base import DatasetError

NAME = "imagefolder"
TEMPLATES = ("a photo of a {c}.",)
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SPLIT_ALIASES = {"valid": "val", "validation": "val"}
CITATION = "layout of SpuCo (Joshi et al., Towards Mitigating Spurious Correlations in the Wild, 2023)"


@dataclass(frozen=True)
class ImageFolderConfig:
    """``--imagefolder_*`` flags."""

    extensions: tuple[str, ...] = option(DEFAULT_EXTENSIONS, "image file extensions to read, case-insensitive",
                                         metavar="EXT")


def _entries(path: Path) -> list[os.DirEntry]:
    """Visible directory entries sorted by name."""
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _is_image(name: str, extensions: Sequence[str]) -> bool:
    return name.rsplit(".", 1)[-1].lower() in extensions if "." in name else False


def scan(root: Path, extensions: Sequence[str]) -> dict[str, dict[str, dict[str, list[str]]]]:
    """``{split: {class: {attribute: [image file names]}}}``, every level sorted."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (robust/{NAME} reads split/class/attribute/image folders)")
    tree: dict[str, dict[str, dict[str, list[str]]]] = {}
    for split_entry in _entries(root):
        if not split_entry.is_dir():
            continue  # README files and the like beside the split folders
        split = SPLIT_ALIASES.get(split_entry.name, split_entry.name)
        if split in tree:
            raise DatasetError(f"{root}: two folders for split {split!r} ({split_entry.name!r} and another)")
        classes = tree.setdefault(split, {})
        for class_entry in _entries(Path(split_entry.path)):
            if not class_entry.is_dir():
                _stray(class_entry, extensions, "split/class/attribute/image")
                continue
            attrs = classes.setdefault(class_entry.name, {})
            for attr_entry in _entries(Path(class_entry.path)):
                if not attr_entry.is_dir():
                    _stray(attr_entry, extensions, "split/class/attribute/image")
                    continue
                images = []
                for image_entry in _entries(Path(attr_entry.path)):
                    if image_entry.is_dir():
                        raise DatasetError(f"{image_entry.path}: a folder below split/class/attribute/ (expected images)")
                    if _is_image(image_entry.name, extensions):
                        images.append(image_entry.name)
                attrs[attr_entry.name] = images
    if not tree:
        raise DatasetError(f"{root}: no split folders (expected e.g. train/ val/ test/)")
    return tree


def _stray(entry: os.DirEntry, extensions: Sequence[str], layout: str) -> None:
    if _is_image(entry.name, extensions):
        raise DatasetError(f"{entry.path}: image at the wrong depth (robust/{NAME} expects {layout})")


def load_imagefolder(request: DatasetRequest) -> FileDataset:
    root = Path(request.root)
    extensions = tuple(e.lower().lstrip(".") for e in reader_config(request, ImageFolderConfig).extensions)
    tree = scan(root, extensions)
    class_values = sorted({c for classes in tree.values() for c in classes})
    attr_values = sorted({a for classes in tree.values() for attrs in classes.values() for a in attrs})
    if not class_values or not attr_values:
        raise DatasetError(f"{root}: no class/attribute folders below the split folders")
    rows: dict[str, list[FileRow]] = {}
    for split_dir in _entries(root):
        if not split_dir.is_dir():
            continue
        split = SPLIT_ALIASES.get(split_dir.name, split_dir.name)
        for cls, attrs in tree[split].items():
            for attr, images in attrs.items():
                for image in images:
                    rel = f"{cls}/{attr}/{image}"
                    rows.setdefault(split, []).append(
                        FileRow(
                            key_from_path(rel),
                            os.path.join(split_dir.path, cls, attr, image),
                            (class_values.index(cls), attr_values.index(attr)),
                            {},
                            f"{root / split_dir.name} {rel}",
                        )
                    )
    return FileDataset(
        name=NAME,
        root=root,
        schema=two_field_schema(class_values, attr_values),
        classnames=[c.replace("_", " ") for c in class_values],
        templates=TEMPLATES,
        rows=rows,
        options={"extensions": list(extensions)},
    )


@hookimpl
def register_datasets(register) -> None:
    register(
        DatasetSpec(
            name=NAME,
            load=load_imagefolder,
            description="split/class/attribute/image folders (SpuCoAnimals layout); names sorted, groups y x a",
            citation=CITATION,
            options=ImageFolderConfig,
            option_prefix="imagefolder_",
        )
    )

