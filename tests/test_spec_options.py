"""A record that declares ``options=`` gets its flags on ``eval`` and receives its own typed config."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from clip_robust_plugins import Mitigation, MitigationSpec, Needs, hookimpl
from clip_robust_plugins.argtypes import option

SEEN: list = []


@dataclass(frozen=True)
class ScaleConfig:
    factor: float = option(1.0, "multiply zero-shot logits by this")


class Scaled(Mitigation):
    def __init__(self, config: ScaleConfig):
        SEEN.append(config)
        self.config = config

    def fit(self, ctx):
        pass

    def predict(self, ctx, split):
        return ctx.zeroshot_logits(ctx.features(split).features) * self.config.factor


class ScalePlugin:
    @hookimpl
    def register_mitigations(self, register):
        register(MitigationSpec("test_scaled", create=Scaled, needs=Needs(), options=ScaleConfig, option_prefix="scaled_"))


def test_declared_options_become_flags_and_a_typed_config(crp_plugin_manager, run_cli, shapes_flags, tmp_path, monkeypatch):
    from clip_robust_plugins import cli

    crp_plugin_manager.register(ScalePlugin(), name="scale_plugin")
    monkeypatch.setattr(cli, "build_plugin_manager", lambda *a, **k: crp_plugin_manager.pm)
    out = tmp_path / "r.json"
    SEEN.clear()
    rc, _, err = run_cli("eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp",
                         "--num_workers", "0", "--quiet", "--no_feature_cache", "--output", out,
                         "--mitigation", "test_scaled", "--scaled_factor", "2.5")
    assert rc == 0, err
    assert SEEN == [ScaleConfig(factor=2.5)]
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["test_scaled/acc"] == metrics["zeroshot/acc"]  # a positive scale keeps every argmax


# ----------------------------------------------------------------------------- an option never declared


def test_an_option_read_that_was_never_declared_is_an_error_not_a_default():
    import argparse

    from clip_robust_plugins.argtypes import add_config_flags, config_from_options, spec_config
    from clip_robust_plugins.plugins import PluginError

    parser = argparse.ArgumentParser()
    add_config_flags(parser, ScaleConfig, "scaled_")
    parsed = parser.parse_args(["--scaled_factor", "3"])
    assert config_from_options(ScaleConfig, "scaled_", parsed) == ScaleConfig(factor=3.0)
    assert config_from_options(ScaleConfig, "scaled_", parser.parse_args([])) == ScaleConfig()  # not given: default
    with pytest.raises(PluginError, match=r"my_plugin: reads option --scald_factor, which this command does not"):
        config_from_options(ScaleConfig, "scald_", parsed, owner="my_plugin")  # a misspelt prefix
    spec = MitigationSpec("test_scaled", create=Scaled, options=ScaleConfig, option_prefix="scaled_")
    with pytest.raises(PluginError, match=r"method 'test_scaled': reads option --scaled_factor"):
        spec_config(spec, argparse.Namespace(seed=0))  # a namespace from a parser that never added the flags
    assert spec_config(MitigationSpec("bare", create=Scaled), parsed) is None  # no options: create(None)


# ----------------------------------------------------------------------------- one flag, two plugins


@dataclass(frozen=True)
class ClashConfig:
    n_fits: int = option(3, "the same flag as DFR's --dfr_n_fits")


class RecordClashPlugin:
    @hookimpl
    def register_mitigations(self, register):
        register(MitigationSpec("test_clash", create=Scaled, options=ClashConfig, option_prefix="dfr_"))


class HookClashPlugin:
    @hookimpl
    def add_arguments(self, parser):
        parser.add_argument("--cfr_epochs", type=int)


class HookClashPlugin2:
    @hookimpl
    def add_arguments(self, parser):
        parser.add_argument("--cfr_epochs", type=int)


def _eval_argv(root, out):
    from clip_robust_plugins.pytest_plugin import TINY_SHARDS_FLAGS

    return ["eval", "--dataset", "robust/spurious_shapes", "--dataset_root", root, *TINY_SHARDS_FLAGS,
            "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp", "--num_workers", "0", "--quiet",
            "--output", out]


@pytest.mark.parametrize("plugins, first, second", [
    # an options= record whose flag a built-in method declares already
    ([("record_clash", RecordClashPlugin)], "'clip_robust_plugins.mitigations.dfr' (method dfr)",
     "plugin 'record_clash' (method test_clash)"),
    # a third party's add_arguments hook that declares a built-in method's flag
    ([("hook_clash", HookClashPlugin)], "plugin 'hook_clash'", "plugin 'clip_robust_plugins.mitigations.cfr' (method cfr)"),
    # two third parties' hooks that declare the same flag
    ([("hook_a", HookClashPlugin), ("hook_b", HookClashPlugin2)], "plugin 'hook_a'", "plugin 'hook_b'"),
])
def test_a_flag_declared_by_two_plugins_is_one_line_naming_both(crp_plugin_manager, run_cli, crp_tiny_shards, tmp_path,
                                                                 monkeypatch, plugins, first, second):
    from clip_robust_plugins import cli

    for name, plugin in plugins:
        crp_plugin_manager.register(plugin(), name=name)
    monkeypatch.setattr(cli, "build_plugin_manager", lambda *a, **k: crp_plugin_manager.pm)
    rc, out, err = run_cli(*_eval_argv(crp_tiny_shards, tmp_path / "r.json"))
    assert rc == 2 and out == "" and "Traceback" not in err
    (line,) = err.strip().splitlines()
    flag = "--dfr_n_fits" if plugins[0][0] == "record_clash" else "--cfr_epochs"
    assert line.startswith(f"clip_benchmark_robust: error: flag {flag} is declared twice: by ")
    assert first in line and second in line, line
    assert list(tmp_path.iterdir()) == []


def test_records_of_one_plugin_share_a_declaration_and_list_it_once(crp_plugin_manager):
    """dfr/dfr_train (one dataclass), ravl/clip_ft (clip_ft's config nested in ravl's): one flag each, both read it."""
    import argparse

    from clip_robust_plugins.argtypes import spec_config
    from clip_robust_plugins.plugins import add_spec_flags, help_topics

    registry = crp_plugin_manager.registry
    parser = argparse.ArgumentParser()
    add_spec_flags(parser, registry)
    args = parser.parse_args(["--dfr_n_fits", "4", "--ravl_epochs", "3"])
    assert spec_config(registry.mitigation("dfr"), args).n_fits == spec_config(registry.mitigation("dfr_train"), args).n_fits == 4
    assert spec_config(registry.mitigation("clip_ft"), args).epochs == spec_config(registry.mitigation("ravl"), args).finetune.epochs == 3
    titles = [g.title for g in parser._action_groups]
    assert "method dfr_train (plugin clip_robust_plugins.mitigations.dfr)" in titles
    dfr_train = next(g for g in parser._action_groups if g.title.startswith("method dfr_train"))
    assert dfr_train._group_actions == [] and "--dfr_n_fits" in dfr_train.description  # listed under dfr
    assert "--dfr_n_fits" in [a.option_strings[0] for a in help_topics(parser)["dfr_train"][1]]  # but its topic has it


# ----------------------------------------------------------------------------- view providers and region proposers


@dataclass(frozen=True)
class ViewsConfig:
    n: int = option(1, "views per sample")


@dataclass(frozen=True)
class RegionsConfig:
    k: int = option(2, "boxes per image")


class ProvidersPlugin:
    @hookimpl
    def register_view_providers(self, register):
        from clip_robust_plugins import ViewProviderSpec

        register(ViewProviderSpec("test_views", lambda config, seed: ("views", config, seed), options=ViewsConfig,
                                  option_prefix="tv_", takes_seed=True))
        register(ViewProviderSpec("test_plain_views", lambda config: ("plain", config)))

    @hookimpl
    def register_region_proposers(self, register):
        from clip_robust_plugins import RegionProposerSpec

        register(RegionProposerSpec("test_regions", lambda config: ("regions", config), options=RegionsConfig,
                                    option_prefix="tr_"))


def test_view_providers_and_region_proposers_get_their_own_typed_config(crp_plugin_manager):
    import argparse
    from types import SimpleNamespace

    from clip_robust_plugins import RunContext
    from clip_robust_plugins.argtypes import spec_config
    from clip_robust_plugins.plugins import add_spec_flags

    crp_plugin_manager.register(ProvidersPlugin(), name="providers")
    registry = crp_plugin_manager.registry
    parser = argparse.ArgumentParser()
    add_spec_flags(parser, registry, kinds=("view_providers", "region_proposers"),
                   only=lambda kind, name: name.startswith("test_"))
    args = parser.parse_args(["--tv_n", "3", "--tr_k", "5"])
    ctx = RunContext(dataset=SimpleNamespace(schema=None), dataset_name="x", classnames=[], templates=[],
                     load_model=None, extractor=None, registry=registry, device="cpu", amp=False, seed=7,
                     eval_split="test", config_of=lambda spec: spec_config(spec, args))
    assert ctx.view_provider("test_views") == ("views", ViewsConfig(n=3), 7)
    assert ctx.view_provider("test_plain_views") == ("plain", None)
    assert ctx.region_proposer("test_regions") == ("regions", RegionsConfig(k=5))
    assert not hasattr(ctx, "options")  # a plugin never sees the whole namespace
