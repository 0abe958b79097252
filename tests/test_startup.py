"""Start-up stays light: registering plugins and building the CLI import no heavy library, a warm
run builds no model, and the example plugin uses only the public API."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "open_clip", "clip_benchmark", "sklearn", "kmedoids", "matplotlib", "webdataset")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "crp-example-plugin" / "crp_example_plugin"


def heavy_modules_after(*argv: str) -> list[str]:
    """Run the CLI with ``argv`` in a fresh interpreter; the heavy modules it imported."""
    code = (
        "import sys\n"
        "from clip_robust_plugins.cli import main\n"
        "try:\n"
        f"    main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("HEAVY="))
    return [m for m in line[len("HEAVY="):].split(",") if m]


@pytest.mark.parametrize("argv", [("plugins",), ("--help",), ("eval", "--help")])
def test_cli_start_up_imports_no_heavy_library(argv):
    assert heavy_modules_after(*argv) == []


def test_importing_the_package_and_its_public_names_stays_light():
    code = (
        "import sys, clip_robust_plugins as c\n"
        "names = ['hookimpl', 'DatasetSpec', 'MitigationSpec', 'Mitigation', 'RunContext', 'RobustDataset',\n"
        "         'GroupSchema', 'SampleImage', 'option', 'add_config_flags', 'CommandSpec']\n"
        "[getattr(c, n) for n in names]\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == ""


def test_every_public_name_resolves():
    import clip_robust_plugins

    for name in clip_robust_plugins.__all__:
        assert getattr(clip_robust_plugins, name) is not None, name
    with pytest.raises(AttributeError):
        clip_robust_plugins.not_a_public_name  # noqa: B018


def test_the_example_plugin_imports_only_top_level_public_names():
    import clip_robust_plugins

    for path in sorted(EXAMPLE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clip_robust_plugins"):
                assert node.module == "clip_robust_plugins", f"{path.name} imports {node.module}"
                assert all(a.name in clip_robust_plugins.__all__ for a in node.names), path.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("clip_robust_plugins.") for a in node.names), path.name


def test_a_warm_run_builds_no_model(run_cli, shapes_flags, tmp_path):
    """Features and the zero-shot head cached: zero-shot + ERM head run without the model."""
    def run(name: str) -> dict:
        out = tmp_path / f"{name}.json"
        rc, _, err = run_cli(
            "eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp",
            "--num_workers", "0", "--feature_cache", str(tmp_path / "cache"), "--output", str(out),
            "--mitigation", "erm_head", "--quiet",
        )
        assert rc == 0, err
        return json.loads(out.read_text())

    cold, warm = run("cold"), run("warm")
    assert cold["robust"]["model_loaded"] is True and cold["robust"]["features_extracted"]
    assert warm["robust"]["model_loaded"] is False and warm["robust"]["features_extracted"] == []
    assert warm["robust"]["zeroshot_head_cache"] == cold["robust"]["zeroshot_head_cache"] is not None
    assert warm["metrics"] == cold["metrics"]
