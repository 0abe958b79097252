"""The robust heads end to end through ``clip_benchmark_robust eval`` on spurious_shapes with crp-tiny."""

from __future__ import annotations

import json
import math

import pytest

HEADS = ["group_dro_head", "jtt_head", "afr", "class_balanced_head", "dfr_labelfree"]
TINY = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--num_workers", "0", "--no_amp"]
#: what each head may read, per split (none of them reads a label its needs do not declare)
LABELS_READ = {
    "group_dro_head": {"train": ["class", "group"], "val": ["class", "group"]},
    "jtt_head": {"train": ["class"], "val": ["class", "group"]},
    "afr": {"train": ["class"], "val": ["class", "group"]},
    "class_balanced_head": {"train": ["class"]},
    "dfr_labelfree": {"train": ["class"], "val": ["class"]},
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, shapes_root):
    from clip_robust_plugins import cli

    out = tmp_path_factory.mktemp("heads_cli")
    flags = ["eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(shapes_root),
             "--shapes_train_size", "64", "--shapes_val_size", "32", "--shapes_test_size", "32", *TINY,
             "--feature_cache", str(out / "cache"), "--mitigation", *HEADS,
             "--jtt_head_lambda_up", "5", "20", "--afr_gamma", "0", "4", "--afr_reg", "0.01", "--dfr_n_fits", "3",
             "--quiet"]
    assert cli.main([*flags, "--save_mitigation_state", "--save_predictions", "--output", str(out / "fit.json")]) == 0
    return out, flags


def test_every_head_runs_and_records_what_it_read(fitted):
    out, _ = fitted
    dump = json.loads((out / "fit.json").read_text())
    for name in HEADS:
        info = dump["robust"]["methods"][name]
        assert info["hyperparameters"]["labels_read"] == LABELS_READ[name], name
        used = {label for labels in LABELS_READ[name].values() for label in labels}
        assert used <= set(info["needs"]["labels"]), name
        for key in ("acc", "worst_group_acc", "balanced_acc"):
            value = dump["metrics"][f"{name}/{key}"]
            assert isinstance(value, float) and 0.0 <= value <= 1.0 and not math.isnan(value)
    jtt, afr = (dump["robust"]["methods"][m]["hyperparameters"] for m in ("jtt_head", "afr"))
    assert jtt["chosen_on"] == afr["chosen_on"] == "val"
    assert [c["lambda_up"] for c in jtt["candidates"]] == [5.0, 20.0, 5.0, 20.0]  # the flags reached the config
    assert jtt["chosen"]["lambda_up"] == jtt["lambda_up_chosen"] and afr["chosen"]["gamma"] == afr["gamma_chosen"]
    assert {(c["gamma"], c["reg"]) for c in afr["candidates"]} == {(0.0, 0.01), (4.0, 0.01)}


def test_saved_states_reload_to_the_same_predictions(fitted, run_cli):
    out, flags = fitted
    states = [str(out / f"fit_state_{name}.safetensors") for name in HEADS]
    rc, _, err = run_cli(*flags, "--mitigation_state", *states, "--save_predictions", "--output", out / "load.json")
    assert rc == 0, err
    loaded = json.loads((out / "load.json").read_text())
    fitted_metrics = json.loads((out / "fit.json").read_text())["metrics"]
    for name in HEADS:
        assert loaded["robust"]["methods"][name]["state_loaded_from"].endswith(f"fit_state_{name}.safetensors")
        assert loaded["metrics"][f"{name}/worst_group_acc"] == fitted_metrics[f"{name}/worst_group_acc"]
    assert (out / "fit_predictions.csv").read_text() == (out / "load_predictions.csv").read_text()
