"""The demo runs the built-in methods; a third party's method only when it declares demo settings."""

from __future__ import annotations

from clip_robust_plugins import Mitigation, MitigationSpec, Needs, hookimpl
from clip_robust_plugins.cli import demo_eval_argv


class Slow(Mitigation):
    def fit(self, ctx):
        pass

    def predict(self, ctx, split):
        return ctx.zeroshot_logits(ctx.features(split).features)


class ThirdParty:
    @hookimpl
    def register_mitigations(self, register):
        register(MitigationSpec("slow_third_party", create=lambda config: Slow(), needs=Needs()))
        register(MitigationSpec("demo_ready", create=lambda config: Slow(), needs=Needs(),
                                demo_flags=("--num_workers", "0")))


def _methods(argv: list[str]) -> list[str]:
    start = argv.index("--mitigation") + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[start:end]


def test_the_demo_skips_third_party_methods_without_demo_settings(crp_plugin_manager):
    before = _methods(demo_eval_argv("out", crp_plugin_manager.registry))
    builtins = [n for n, s in crp_plugin_manager.registry.mitigations.items() if not s.baseline]
    assert before == builtins and "dfr" in before
    crp_plugin_manager.register(ThirdParty(), name="third_party")
    after = _methods(demo_eval_argv("out", crp_plugin_manager.registry))
    assert "slow_third_party" not in after
    assert after == [*before, "demo_ready"]
