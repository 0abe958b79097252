"""Shared fixtures: small generated shards and a seeded random checkpoint (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate

SMALL = dict(train_size=64, val_size=32, test_size=32)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """robust/spurious_shapes with small splits, generated once per session."""
    root = tmp_path_factory.mktemp("shapes") / "data"
    generate(root, ShapesConfig(**SMALL), progress=False)
    return root


@pytest.fixture()
def shapes_flags(shapes_root) -> list[str]:
    """Flags that select the session's small spurious_shapes root."""
    return [
        "--dataset", "robust/spurious_shapes", "--dataset_root", str(shapes_root),
        "--shapes_train_size", str(SMALL["train_size"]), "--shapes_val_size", str(SMALL["val_size"]),
        "--shapes_test_size", str(SMALL["test_size"]),
    ]


@pytest.fixture()
def run_cli(capsys):
    """Run ``clip_benchmark_robust`` in-process; returns (exit code, stdout, stderr)."""
    from clip_robust_plugins import cli

    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_pretrained() -> str:
    """The shipped crp-tiny checkpoint's tag (resolved offline by the built-in models plugin)."""
    return "spurious_shapes"
