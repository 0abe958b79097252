"""The plugin system: hooks, registry, entry points, allow-list, import failures, tracing, ``--plugin``.

Everything here runs in-process (no subprocess): the CLI is ``clip_robust_plugins.cli.main``.
Installed plugins are simulated with ``*.dist-info`` directories on ``sys.path``, which is
exactly what ``importlib.metadata`` (and so our entry-point discovery) reads.
"""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import clip_robust_plugins
from clip_robust_plugins import DatasetSpec, MetricSpec, MitigationSpec, Needs, cli, hookimpl, plugins
from clip_robust_plugins.mitigations.base import Mitigation
from clip_robust_plugins.plugins import PluginError, PluginImportWarning
from clip_robust_plugins.pytest_plugin import TINY_MODEL, TINY_PRETRAINED

KINDS = ("datasets", "metrics", "mitigations", "model_loaders", "checkpoints", "view_providers", "region_proposers", "commands")
TRACE_PREFIX = "[clip_robust_plugins trace]"


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def cli_run(capsys):
    """``clip_benchmark_robust ARGS`` in-process -> (exit code, stdout, stderr, PluginImportWarnings)."""

    def run(*argv: str):
        capsys.readouterr()  # only this command's output
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err, [w for w in caught if issubclass(w.category, PluginImportWarning)]

    return run


def write_module(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def write_dist(site: Path, dist: str, version: str, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution (``*.dist-info``) declaring ``clip_robust_plugins`` entry points."""
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[clip_robust_plugins]\n{lines}")


PLUGIN_SOURCE = """
from clip_robust_plugins import MetricSpec, hookimpl

@hookimpl
def register_metrics(register):
    register(MetricSpec("{metric}", lambda p: {{"{metric}": 1.0}}))
"""


@pytest.fixture
def fake_site(tmp_path, monkeypatch) -> Path:
    """A site directory on sys.path holding two installed plugins and one that fails to import.

    ``fake_a`` (dist crp_fake_a 1.2.3) registers metric ``fake_a_metric``; ``fake_b`` (dist
    crp_fake_b 0.0.1) registers ``fake_b_metric``; ``fake_broken`` raises at import.
    """
    site = tmp_path / "site"
    site.mkdir()
    write_module(site, "crp_fake_a", PLUGIN_SOURCE.format(metric="fake_a_metric"))
    write_module(site, "crp_fake_b", PLUGIN_SOURCE.format(metric="fake_b_metric"))
    write_module(site, "crp_fake_broken", "raise RuntimeError('fake_broken cannot start')\n")
    write_dist(site, "crp_fake_a", "1.2.3", {"fake_a": "crp_fake_a"})
    write_dist(site, "crp_fake_b", "0.0.1", {"fake_b": "crp_fake_b"})
    write_dist(site, "crp_fake_broken", "0.1", {"fake_broken": "crp_fake_broken"})
    monkeypatch.syspath_prepend(str(site))
    for name in ("crp_fake_a", "crp_fake_b", "crp_fake_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return site


def third_party_names(pm) -> set[str]:
    return {pm.get_name(p) for p in pm.get_plugins()} - set(plugins.BUILTIN_PLUGINS)


class Registers:
    """A test plugin object (not a module) registering one record of one kind."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name

    @hookimpl
    def register_datasets(self, register):
        if self.kind == "datasets":
            register(DatasetSpec(self.name, load=lambda request: None))

    @hookimpl
    def register_metrics(self, register):
        if self.kind == "metrics":
            register(MetricSpec(self.name, compute=lambda p: {}))

    @hookimpl
    def register_mitigations(self, register):
        if self.kind == "mitigations":
            register(MitigationSpec(self.name, create=lambda options: None))


# ---------------------------------------------------------------------------- built-ins
def test_builtins_register_through_the_hooks(crp_plugin_manager):
    pm, registry = crp_plugin_manager.pm, crp_plugin_manager.registry
    # every built-in is an ordinary plugin, registered under its module name, implementing hooks
    assert {pm.get_name(p) for p in pm.get_plugins()} == set(plugins.BUILTIN_PLUGINS)
    for name in plugins.BUILTIN_PLUGINS:
        assert pm.get_hookcallers(pm.get_plugin(name)), f"{name} implements no hook"
    assert registry.dataset("spurious_shapes").load is not None
    assert registry.owner("datasets", "spurious_shapes") == "clip_robust_plugins.datasets.spurious_shapes"
    assert {"group", "clip_benchmark"} <= set(registry.metrics)
    assert registry.owner("metrics", "group") == "clip_robust_plugins.metrics"
    assert {"zeroshot", "erm_head"} <= set(registry.mitigations)
    assert registry.owner("mitigations", "zeroshot") == "clip_robust_plugins.mitigations.zeroshot"
    assert registry.owner("mitigations", "erm_head") == "clip_robust_plugins.mitigations.erm_head"
    assert "open_clip" in registry.model_loaders and registry.owner("model_loaders", "open_clip") == "clip_robust_plugins.models"
    assert registry.checkpoint(TINY_MODEL, TINY_PRETRAINED) is not None
    # every record is owned by the plugin that registered it, and only built-ins own anything here
    for kind in KINDS:
        for name in getattr(registry, kind):
            assert registry.owner(kind, name) in plugins.BUILTIN_PLUGINS
    # no special path: a built-in that is not registered contributes nothing
    pm.unregister(name="clip_robust_plugins.mitigations.erm_head")
    assert "erm_head" not in plugins.collect_registry(pm).mitigations


def test_registry_names_unknown_records(crp_plugin_manager):
    with pytest.raises(PluginError, match=r"unknown mitigation 'nope'; registered: .*erm_head"):
        crp_plugin_manager.registry.mitigation("nope")


# --------------------------------------------------------------------------- duplicates
@pytest.mark.parametrize(
    "kind,name,owner",
    [
        ("datasets", "spurious_shapes", "clip_robust_plugins.datasets.spurious_shapes"),
        ("metrics", "group", "clip_robust_plugins.metrics"),
        ("mitigations", "erm_head", "clip_robust_plugins.mitigations.erm_head"),
    ],
)
def test_duplicate_name_of_a_builtin_names_both_plugins(crp_plugin_manager, kind, name, owner):
    with pytest.raises(PluginError) as info:
        crp_plugin_manager.register(Registers(kind, name), name="my_dup_plugin")
    message = str(info.value)
    assert f"duplicate {kind[:-1]} name {name!r}" in message
    assert repr(owner) in message and "'my_dup_plugin'" in message
    # the failed plugin was taken out again; the manager still works
    assert not crp_plugin_manager.pm.has_plugin("my_dup_plugin")
    assert crp_plugin_manager.registry.owner(kind, name) == owner


def test_duplicate_between_two_third_party_plugins(crp_plugin_manager):
    crp_plugin_manager.register(Registers("metrics", "shared_name"), name="first_plugin")
    assert crp_plugin_manager.registry.owner("metrics", "shared_name") == "first_plugin"
    with pytest.raises(PluginError, match=r"'first_plugin' and by plugin 'second_plugin'"):
        crp_plugin_manager.register(Registers("metrics", "shared_name"), name="second_plugin")


def test_wrong_record_type_is_a_plugin_error(crp_plugin_manager):
    class Wrong:
        @hookimpl
        def register_metrics(self, register):
            register(DatasetSpec("not_a_metric", load=lambda request: None))

    with pytest.raises(PluginError, match=r"plugin 'wrong'.*register_metrics.*expected a MetricSpec"):
        crp_plugin_manager.register(Wrong(), name="wrong")


def test_duplicate_through_the_cli_is_one_line_error(cli_run, tmp_path, monkeypatch):
    write_module(tmp_path, "crp_test_dup_plugin", """
        from clip_robust_plugins import MitigationSpec, hookimpl

        @hookimpl
        def register_mitigations(register):
            register(MitigationSpec("erm_head", create=lambda options: None))
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, out, err, _ = cli_run("plugins", "--plugin", "crp_test_dup_plugin")
    assert rc == 2 and out == ""
    assert err.strip().count("\n") == 0  # one line, no traceback
    assert "'clip_robust_plugins.mitigations.erm_head'" in err and "'crp_test_dup_plugin'" in err


# ----------------------------------------------------------------------- import failures
@pytest.mark.parametrize("how", ["raises", "missing"])
def test_plugin_that_fails_to_import_warns_once_and_the_rest_works(cli_run, tmp_path, monkeypatch, how):
    module = "crp_test_raising_plugin" if how == "raises" else "crp_test_no_such_module_xyz"
    if how == "raises":
        write_module(tmp_path, module, "raise ImportError('needs a library that is not installed')\n")
        monkeypatch.syspath_prepend(str(tmp_path))
    rc, out, err, caught = cli_run("plugins", "--json", "--plugin", module)
    assert rc == 0
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert repr(module) in message and "skipped" in message
    if how == "raises":
        assert "needs a library that is not installed" in message
    rows = json.loads(out)
    names = {r["name"] for r in rows}
    assert set(plugins.BUILTIN_PLUGINS) <= names and module not in names


def test_installed_plugin_that_fails_to_import_warns_once(cli_run, fake_site, monkeypatch):
    monkeypatch.delenv(plugins.ENV_ALLOWLIST, raising=False)
    rc, out, _, caught = cli_run("plugins", "--json")
    assert rc == 0
    assert len(caught) == 1 and "'fake_broken'" in str(caught[0].message)
    assert "fake_broken cannot start" in str(caught[0].message)
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"fake_a", "fake_b"} <= set(rows) and "fake_broken" not in rows
    assert rows["fake_a"]["version"] == "1.2.3" and rows["fake_b"]["version"] == "0.0.1"
    assert rows["fake_a"]["registers"]["metrics"] == ["fake_a_metric"]


# --------------------------------------------------------------------------- allow-list
def test_allow_list_env_var(fake_site, monkeypatch):
    monkeypatch.delenv(plugins.ENV_ALLOWLIST, raising=False)
    with pytest.warns(PluginImportWarning, match="fake_broken"):
        everything = plugins.build_plugin_manager()
    assert {"fake_a", "fake_b"} <= third_party_names(everything)

    monkeypatch.setenv(plugins.ENV_ALLOWLIST, "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the broken plugin is not even imported
        none = plugins.build_plugin_manager()
    assert third_party_names(none) == set()
    registry = plugins.collect_registry(none)
    assert "spurious_shapes" in registry.datasets and "erm_head" in registry.mitigations  # built-ins stay

    monkeypatch.setenv(plugins.ENV_ALLOWLIST, "fake_b")
    only_b = plugins.build_plugin_manager()
    assert third_party_names(only_b) == {"fake_b"}
    assert "fake_b_metric" in plugins.collect_registry(only_b).metrics

    monkeypatch.setenv(plugins.ENV_ALLOWLIST, " fake_a , fake_b ")
    assert third_party_names(plugins.build_plugin_manager()) == {"fake_a", "fake_b"}


# ------------------------------------------------------------------------------ tracing
@pytest.mark.parametrize("switch", ["env", "flag", "off"])
def test_trace_switch_logs_every_hook_call_to_stderr(cli_run, monkeypatch, switch):
    monkeypatch.delenv(plugins.ENV_TRACE, raising=False)
    argv = ["plugins", "--json"]
    if switch == "env":
        monkeypatch.setenv(plugins.ENV_TRACE, "1")
    elif switch == "flag":
        argv.append("--trace_plugins")
    monkeypatch.setenv(plugins.ENV_ALLOWLIST, "")
    rc, out, err, _ = cli_run(*argv)
    assert rc == 0 and json.loads(out)  # stdout stays pure JSON
    traced = [line for line in err.splitlines() if line.startswith(TRACE_PREFIX)]
    if switch == "off":
        assert traced == []
        return
    pm = plugins.build_plugin_manager(trace=False)
    for hook in ("register_datasets", "register_metrics", "register_mitigations", "register_model_loaders",
                 "register_checkpoints", "register_commands"):
        # one call (and one "finish") per implementing plugin: every hook call is logged
        calls = [line for line in traced if line.endswith(f" {hook} [hook]") and " finish " not in line]
        finished = [line for line in traced if f" finish {hook} -->" in line]
        implementers = len(getattr(pm.hook, hook).get_hookimpls())
        assert len(calls) == len(finished) == implementers >= 1, (hook, calls)
    # `plugins` builds no subcommand's flags: add_arguments is never called
    assert not [line for line in traced if line.endswith(" add_arguments [hook]")]


# ------------------------------------------------------------------------ plugins JSON
def test_plugins_command_lists_name_version_hooks_registers(cli_run, monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOWLIST, "")
    rc, out, err, caught = cli_run("plugins", "--json")
    assert rc == 0 and not caught
    rows = json.loads(out)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(plugins.BUILTIN_PLUGINS)
    for row in rows:
        assert set(row) == {"name", "version", "hooks", "registers"}
        assert row["version"] == clip_robust_plugins.__version__
        assert row["hooks"] == sorted(row["hooks"]) and row["hooks"]
        assert set(row["registers"]) == set(KINDS)
    shapes = by_name["clip_robust_plugins.datasets.spurious_shapes"]
    assert shapes["hooks"] == ["register_datasets"]  # its flags come from DatasetSpec(options=...)
    assert shapes["registers"]["datasets"] == ["robust/spurious_shapes"]  # the name the CLI takes
    assert by_name["clip_robust_plugins.mitigations.erm_head"]["registers"]["mitigations"] == ["erm_head"]


# ---------------------------------------------------------------------- --plugin MODULE
FLIP_PLUGIN = """
import torch
from clip_robust_plugins import MitigationSpec, Needs, hookimpl
from clip_robust_plugins.mitigations.base import Mitigation

class Flip(Mitigation):
    '''Zero-shot with the class order reversed: a mitigation that must change predictions.'''

    def fit(self, ctx):
        self.fitted = True

    def predict(self, ctx, split):
        return ctx.zeroshot_logits(ctx.features(split).features).flip(1)

    def hyperparameters(self):
        return {"flip": True}

@hookimpl
def add_arguments(parser):
    parser.add_argument("--flip_note", default="none")

@hookimpl
def register_mitigations(register):
    register(MitigationSpec("test_flip", create=lambda options: Flip(), needs=Needs(labels=frozenset())))
"""


def test_plugin_flag_loads_a_module_for_one_run_and_its_mitigation_runs(
    crp_eval, crp_tiny_shards, tiny_pretrained, tmp_path, monkeypatch, cli_run
):
    write_module(tmp_path, "crp_test_flip_plugin", FLIP_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    results = crp_eval(
        "--flip_note", "from-the-plugin-flag",  # the plugin's own flag parses
        mitigation=["test_flip"], plugins=["crp_test_flip_plugin"], pretrained=tiny_pretrained,
    )
    metrics = results["metrics"]
    info = results["robust"]["methods"]["test_flip"]
    assert info["plugin"] == "crp_test_flip_plugin" and info["hyperparameters"] == {"flip": True}
    assert info["needs"]["labels"] == []
    # two classes: flipping the logits turns every right answer into a wrong one
    assert metrics["test_flip/acc"] == pytest.approx(1.0 - metrics["zeroshot/acc"])
    assert metrics["test_flip/group_count/y:square_a:land"] == 6.0  # 24 test images / 4 groups
    # for one run only: the next command does not know it
    rc, out, _, _ = cli_run("plugins", "--json")
    assert rc == 0 and "crp_test_flip_plugin" not in {r["name"] for r in json.loads(out)}
    assert "test_flip" not in plugins.collect_registry(plugins.build_plugin_manager()).mitigations


# ------------------------------------------------------------------ the pytest plugin
class BiasToClassZero(Mitigation):
    """Zero-shot plus a large bias towards class 0 (so every prediction is class 0)."""

    def fit(self, ctx):
        pass

    def predict(self, ctx, split):
        logits = ctx.zeroshot_logits(ctx.features(split).features)
        logits[:, 0] += 1e6
        return logits

    def state_dict(self):
        return {"bias0": torch.tensor(1e6)}


class BiasPlugin:
    @hookimpl
    def register_mitigations(self, register):
        register(MitigationSpec("test_bias0", create=lambda options: BiasToClassZero(), needs=Needs()))


def test_registered_test_plugin_takes_part_in_crp_eval(crp_plugin_manager, crp_eval, tiny_pretrained):
    name = crp_plugin_manager.register(BiasPlugin(), name="bias_plugin")
    assert name == "bias_plugin" and "bias_plugin" in crp_plugin_manager.names()
    assert crp_plugin_manager.registry.owner("mitigations", "test_bias0") == "bias_plugin"
    results = crp_eval(mitigation=["test_bias0"], pretrained=tiny_pretrained)
    metrics = results["metrics"]
    assert metrics["test_bias0/group_acc/y:square_a:land"] == 1.0
    assert metrics["test_bias0/group_acc/y:diamond_a:water"] == 0.0
    assert metrics["test_bias0/acc"] == 0.5 and results["robust"]["methods"]["test_bias0"]["plugin"] == "bias_plugin"


def test_there_is_no_process_wide_registry():
    # plugins are handed the registry of their run; nothing can look one up globally
    assert not hasattr(plugins, "get_registry") and not hasattr(plugins, "set_plugin_manager")


def test_crp_tiny_shards_is_a_grouped_shard_set(crp_tiny_shards):
    from clip_robust_plugins.datasets.wds import GroupedShards

    shards = GroupedShards(crp_tiny_shards)
    assert shards.splits() == ("test", "train", "val")
    assert list(shards.schema.counts("val")) == [6, 6, 6, 6]
    assert int(shards.schema.counts("train").sum()) == 48
    key, image, fields = next(iter(shards.samples("test", None)))
    assert image.size == (32, 32) and fields.tolist() in ([0, 0], [0, 1], [1, 0], [1, 1])


def test_crp_tiny_model_fixture(crp_tiny_model):
    model, transform, tokenizer = crp_tiny_model
    from PIL import Image

    image = transform(Image.new("RGB", (32, 32))).unsqueeze(0)
    with torch.no_grad():
        image_features = model.encode_image(image, normalize=True)
        text_features = model.encode_text(tokenizer(["a photo of a circle."]), normalize=True)
    assert image_features.shape == text_features.shape == (1, 64)
