"""The six text-side methods end to end through the CLI on spurious_shapes with crp-tiny."""

from __future__ import annotations

TEXT_METHODS = ("group_prompts", "orth_proj", "orth_cali", "roboshot", "perception_clip", "tie_star")


def test_all_six_run_and_record_prompts(crp_eval):
    results = crp_eval(mitigation=TEXT_METHODS)
    methods = results["robust"]["methods"]
    for name in TEXT_METHODS:
        info = methods[name]
        assert info["needs"]["labels"] == []
        hp = info["hyperparameters"]
        assert hp["labels_used"] == []
        assert hp["prompts"]["spurious_field"] == "a"
        assert f"{name}/worst_group_acc" in results["metrics"]
    assert methods["group_prompts"]["hyperparameters"]["prompts"]["group"]["square"]["land"][0] == \
        "a photo of a square on a land background."
    assert methods["orth_proj"]["hyperparameters"]["prompts"]["spurious"]["water"] == \
        ["a photo with a water background.", "a photo of water."]
    assert methods["roboshot"]["hyperparameters"]["prompts"]["reject"][0] == \
        ["a photo with a land background.", "a photo with a water background."]
    assert methods["tie_star"]["needs"]["fit_splits"] == ["train"]
    assert sum(methods["tie_star"]["hyperparameters"]["inferred_counts"]) > 0
