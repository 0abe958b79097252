"""A third-party subcommand declares its flags as one ``option()`` dataclass and receives its
typed config (never the namespace): positional and required inputs, nested sections with their
own prefix, a flag clash with a dataset plugin named in one line, and an exception in ``run``
as one line naming the command and the stage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clip_robust_plugins import CommandSpec, hookimpl, option
from clip_robust_plugins.argtypes import config_flags, config_from_options, nested

SEEN: list = []


@dataclass(frozen=True)
class Window:
    width: int = option(3, "window width")


@dataclass(frozen=True)
class CountConfig:
    inputs: tuple[str, ...] = option((), "files to count", positional=True, nargs="+")
    output: str = option("", "where the counts go", required=True)
    minimum: int = option(0, "skip files with fewer lines")
    verbose: bool = option(False, "print each file", switch=True)
    window: Window = nested(Window, prefix="win_")


def count_lines(config: CountConfig, ctx) -> int:
    SEEN.append((config, ctx))
    counts = {path: len(Path(path).read_text().splitlines()) for path in config.inputs}
    if config.minimum < 0:
        raise ValueError("minimum must be at least 0")
    Path(config.output).write_text(json.dumps({k: v for k, v in counts.items() if v >= config.minimum}))
    return 0


class CountPlugin:
    @hookimpl
    def register_commands(self, register):
        register(CommandSpec("count_lines", "count lines in text files", count_lines, options=CountConfig,
                             option_prefix="count_"))


class ClashingPlugin:
    """A command whose own flag is also a dataset's flag (``--shapes_seed``)."""

    @hookimpl
    def register_commands(self, register):
        @dataclass(frozen=True)
        class Clash:
            seed: int = option(0, "a seed")

        register(CommandSpec("clash", "clashes", lambda config, ctx: 0, options=Clash, option_prefix="shapes_",
                             record_flags=("datasets",)))


@pytest.fixture()
def cli_with(crp_plugin_manager, monkeypatch, run_cli):
    from clip_robust_plugins import cli

    def install(plugin, name):
        crp_plugin_manager.register(plugin, name=name)
        monkeypatch.setattr(cli, "build_plugin_manager", lambda *a, **k: crp_plugin_manager.pm)
        return run_cli

    SEEN.clear()
    return install


def test_a_command_gets_its_typed_config(cli_with, tmp_path):
    run = cli_with(CountPlugin(), "count_plugin")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("1\n2\n3\n")
    b.write_text("1\n")
    out = tmp_path / "counts.json"
    rc, _, err = run("count_lines", a, b, "--count_output", out, "--count_minimum", "2", "--count_verbose",
                     "--win_width", "5")
    assert rc == 0, err
    config, ctx = SEEN[-1]
    assert isinstance(config, CountConfig)
    assert config.inputs == (str(a), str(b))
    assert (config.minimum, config.verbose, config.window) == (2, True, Window(5))
    assert ctx.registry.commands["count_lines"].options is CountConfig
    assert json.loads(out.read_text()) == {str(a): 3}


def test_defaults_fill_what_is_not_given(cli_with, tmp_path):
    run = cli_with(CountPlugin(), "count_plugin")
    a = tmp_path / "a.txt"
    a.write_text("x\n")
    rc, _, err = run("count_lines", a, "--count_output", tmp_path / "o.json")
    assert rc == 0, err
    config, _ = SEEN[-1]
    assert (config.minimum, config.verbose, config.window.width) == (0, False, 3)


@pytest.mark.parametrize("argv, needle", [
    (["--count_output", "o.json"], "inputs"),  # the positional input is missing
    (["a.txt"], "--count_output"),  # the required flag is missing
    (["a.txt", "--count_output", "o.json", "--count_minimum", "two"], "--count_minimum"),
])
def test_missing_or_bad_flags_are_argparse_errors(cli_with, argv, needle):
    run = cli_with(CountPlugin(), "count_plugin")
    with pytest.raises(SystemExit) as exited:
        run("count_lines", *argv)
    assert exited.value.code == 2
    assert not SEEN


def test_the_help_lists_every_flag(crp_plugin_manager, monkeypatch, capsys):
    from clip_robust_plugins import cli

    crp_plugin_manager.register(CountPlugin(), name="count_plugin")
    monkeypatch.setattr(cli, "build_plugin_manager", lambda *a, **k: crp_plugin_manager.pm)
    with pytest.raises(SystemExit):
        cli.main(["count_lines", "--help"])
    out = capsys.readouterr().out
    for flag in ("--count_output", "--count_minimum", "--count_verbose", "--win_width", "inputs"):
        assert flag in out, flag
    assert "skip files with fewer lines (default: 0)" in " ".join(out.split())


def test_an_error_in_run_is_one_line(cli_with, tmp_path):
    run = cli_with(CountPlugin(), "count_plugin")
    a = tmp_path / "a.txt"
    a.write_text("x\n")
    out = tmp_path / "o.json"
    rc, _, err = run("count_lines", a, "--count_output", out, "--count_minimum", "-1")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    for needle in ("count_lines", "count_plugin", "run", "minimum must be at least 0"):
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()


def test_a_flag_clashing_with_a_dataset_flag_names_both(cli_with):
    run = cli_with(ClashingPlugin(), "clash_plugin")
    rc, _, err = run("clash")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    for needle in ("--shapes_seed", "clash_plugin", "spurious_shapes"):
        assert needle in lines[0], (needle, lines[0])


def test_nested_sections_take_their_own_prefix():
    import argparse

    flags = [flag.flag for flag in config_flags(CountConfig, "count_")]
    assert "--win_width" in flags and "--count_window_width" not in flags  # its own prefix replaces the outer one
    options = argparse.Namespace(count_inputs=["x"], count_output="o", count_minimum=1, count_verbose=False,
                                 win_width=9)
    config = config_from_options(CountConfig, "count_", options, owner="count_lines")
    assert config.window == Window(9) and config.inputs == ("x",)


def test_a_config_read_of_an_undeclared_flag_is_an_error():
    import argparse

    from clip_robust_plugins import PluginError

    with pytest.raises(PluginError, match="count_lines.*count_output"):
        config_from_options(CountConfig, "count_", argparse.Namespace(count_inputs=["x"]), owner="count_lines")


def test_list_options_and_plain_fields():
    @dataclass(frozen=True)
    class Listed:
        names: tuple[str, ...] = option(("a",), "names", nargs="*")
        extra: dict = field(default_factory=dict)

    flags = {flag.flag: flag for flag in config_flags(Listed, "")}
    assert list(flags) == ["--names"]  # a plain field is no flag
    assert flags["--names"].kwargs["nargs"] == "*"
    with pytest.raises(TypeError, match="immutable"):
        option(["a"], "a list default")


def test_the_guides_command_runs_as_written(tmp_path, monkeypatch, cli_with):
    import re
    import sys

    doc = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
    code = re.findall(r"```python\n(# my_package/count.py.*?)```", doc.read_text(), flags=re.S)[0]
    (tmp_path / "guide_count.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import guide_count

    try:
        run = cli_with(guide_count, "guide_count")
        a, b = tmp_path / "a.txt", tmp_path / "b.txt"
        a.write_text("1\n2\n")
        b.write_text("")
        out = tmp_path / "counts.json"
        rc, _, err = run("count_lines", a, b, "--count_output", out, "--count_minimum", "1")
        assert rc == 0, err
        assert json.loads(out.read_text()) == {str(a): 2}
    finally:
        sys.modules.pop("guide_count", None)
