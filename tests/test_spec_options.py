"""A record that declares ``options=`` gets its flags on ``eval`` and receives its own typed config."""

from __future__ import annotations

import json
from dataclasses import dataclass

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
