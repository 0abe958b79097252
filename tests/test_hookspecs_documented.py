"""Every hook a plugin can implement is documented in docs/plugins.md (as datasette checks)."""

from __future__ import annotations

import inspect
from pathlib import Path

from clip_robust_plugins import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, f"{hookspecs.hookspec.project_name}_spec")]


def test_the_hooks_are_found():
    assert {"register_mitigations", "register_datasets", "register_metrics"} <= set(hook_names())


def test_every_hookspec_is_documented_in_plugins_md():
    text = DOCS.read_text(encoding="utf-8")
    missing = [name for name in hook_names() if f"`{name}`" not in text]
    assert not missing, f"hookspecs not documented in docs/plugins.md: {missing}"
