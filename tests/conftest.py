"""Shared fixtures: small generated shards and a seeded random checkpoint (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_robust_plugins.datasets.spurious_quadrants import QuadrantsConfig
from clip_robust_plugins.datasets.spurious_quadrants import generate as generate_quadrants
from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate

SMALL = dict(train_size=64, val_size=32, test_size=32)
#: the small robust/spurious_quadrants split sizes the RaVL tests share
QSMALL = dict(train_size=64, val_size=64, test_size=32)


@pytest.fixture()
def one_thread():
    """Tiny matmuls are dominated by thread start-up on a shared 2-core box: one torch thread."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def quadrants_root(tmp_path_factory) -> Path:
    """robust/spurious_quadrants with the QSMALL splits, generated once per session."""
    root = tmp_path_factory.mktemp("quadrants") / "data"
    generate_quadrants(root, QuadrantsConfig(**QSMALL), progress=False)
    return root


@pytest.fixture()
def quadrants_flags(quadrants_root) -> list[str]:
    """Flags that select the session's small spurious_quadrants root and the shipped biased model."""
    return ["--dataset", "robust/spurious_quadrants", "--dataset_root", str(quadrants_root),
            *[x for k, v in QSMALL.items() for x in (f"--quadrants_{k}", str(v))],
            "--model", "crp-tiny", "--pretrained", "spurious_quadrants", "--num_workers", "0", "--no_amp",
            "--batch_size", "64"]


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


@pytest.fixture(scope="session")
def load_script():
    """``load_script("name")``: the module ``scripts/name.py`` (scripts are not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
