"""``all_baselines`` expands to the registered methods the dataset's labels and splits allow."""

from __future__ import annotations

import json
import types

import pytest

from clip_robust_plugins.mitigations.named_sets import expand_named_sets
from clip_robust_plugins.plugins import build_plugin_manager, collect_registry


def test_all_baselines_filters_by_labels_and_splits():
    registry = collect_registry(build_plugin_manager())
    full = types.SimpleNamespace(has_group_labels=True, splits=lambda: ("train", "val", "test"))
    methods, skipped = expand_named_sets(["all_baselines"], registry, full)
    expected = sorted(n for n, s in registry.mitigations.items() if not s.baseline)
    assert methods == expected and not skipped
    no_groups = types.SimpleNamespace(has_group_labels=False, splits=lambda: ("test",))
    methods, skipped = expand_named_sets(["dfr", "all_baselines"], registry, no_groups)
    assert methods[0] == "dfr"
    for name, spec in registry.mitigations.items():
        ok = not spec.baseline and "group" not in spec.needs.labels and not spec.needs.fit_splits
        assert (name in methods[1:]) == ok or name == "dfr"
    assert "tie_star" in skipped and "group_prompts" in methods


@pytest.mark.slow
def test_all_baselines_runs_every_method_the_dataset_can_serve(run_cli, shapes_flags, tmp_path):
    """``--mitigation all_baselines`` on a dataset with group labels: every registered method runs."""
    from clip_robust_plugins.plugins import build_plugin_manager, collect_registry

    out = tmp_path / "all.json"
    rc, _, err = run_cli("eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--quiet",
                         "--num_workers", "0", "--no_feature_cache", "--mitigation", "all_baselines",
                         "--seraser_steps", "1", "--cfr_epochs", "1", "--cfr_erm_epochs", "1", "--ravl_epochs", "1",
                         "--wise_ft_epochs", "1", "--output", out)
    assert rc == 0, err[-2000:]
    ran = set(json.loads(out.read_text())["robust"]["methods"])
    assert ran == set(collect_registry(build_plugin_manager()).mitigations)
