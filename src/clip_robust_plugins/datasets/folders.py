"""Folder helpers for readers of image-folder layouts (Spawrious, MetaShift, ImageNet-9, ...).

Listings are sorted (never ``os.listdir`` order), extensions match case-insensitively
(``.JPEG`` and ``.jpg`` alike), and hidden entries are skipped: macOS copies carry
``._name.jpg`` resource-fork files and ``.DS_Store``, which are not images.  Symlinked
files and folders are followed (datasets are often linked in from shared storage).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .base import DatasetError

#: the image file extensions folder readers accept by default
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path; a missing folder (or a file in its place) is an error saying what it should hold."""
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"{p}: {what} folder {'is not a directory' if p.exists() else 'not found'}")
    return p


def subfolders(path: str | os.PathLike) -> list[str]:
    """The names of the (non-hidden) folders directly in ``path``, sorted."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def list_images(folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
    """The names of the image files directly in ``folder``, sorted; other files are ignored.

    ``extensions`` without dots, matched case-insensitively.  A dangling symlink with an
    image name is listed (opening it later is an error naming it, not a silently smaller split).
    """
    wanted = {e.lower().lstrip(".") for e in extensions}
    with os.scandir(folder) as it:
        names = [e.name for e in it if not e.name.startswith(".") and not e.is_dir()]
    return sorted(n for n in names if n.rpartition(".")[2].lower() in wanted and "." in n)
