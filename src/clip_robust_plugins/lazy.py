"""Names of a package resolved on first use, so importing it (and registering its hooks) stays
cheap: a fixed table, never a search, because pluggy probes plugin modules for every hook name."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, table: Mapping[str, str], cache: dict | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``name`` from submodule ``table[name]`` of ``package``
    (stored into ``cache``, the module's globals, when given); unknown names raise AttributeError."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        if cache is not None:
            cache[name] = value
        return value

    return __getattr__
