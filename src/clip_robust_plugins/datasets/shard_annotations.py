"""What local grouped shards written without an ``annotations`` record carry (masks, boxes, json keys).

Our writer stores that record in ``groups.json``; shards from elsewhere lack it, so
:func:`scan_shards` reads it from the tar headers (``<key>.mask.png`` entries, image data
skipped) and each sample's small json entry (boxes and other keys), once per split.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def scan_shards(shards: Iterable[Path]) -> dict[str, Any]:
    """``{"mask", "box", "json_keys", "samples"}`` of the samples in ``shards`` (same form as the record)."""
    entries: dict[str, set[str]] = {}
    json_keys: dict[str, int] = {}
    boxed = 0
    for path in shards:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                stem, _, ext = base.partition(".")
                entries.setdefault(posixpath.join(folder, stem), set()).add(ext)
                if ext != "json":
                    continue
                meta = _json_entry(tar, member)
                for key in meta:
                    json_keys[key] = json_keys.get(key, 0) + 1
                boxed += meta.get("box") is not None
    n = len(entries)
    masks = sum("mask.png" in exts for exts in entries.values())
    return {"mask": n > 0 and masks == n, "box": n > 0 and boxed == n, "json_keys": dict(sorted(json_keys.items())),
            "samples": n}


def _json_entry(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    handle = tar.extractfile(member)
    try:
        meta = json.loads(handle.read()) if handle is not None else {}
    except ValueError:
        return {}  # the reader reports a bad json by name when it reads the sample; here it has no keys
    return meta if isinstance(meta, dict) else {}
