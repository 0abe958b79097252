"""The results JSON is standard JSON: no NaN or Infinity, ``null`` with its reason recorded once."""

from __future__ import annotations

import json
import math

from clip_robust_plugins.run_output import standard_json


def _strict_load(path):
    with open(path) as fh:
        return json.load(fh, parse_constant=lambda c: 1 / 0)  # NaN, Infinity, -Infinity are refused


def test_a_two_class_run_writes_strict_json_with_null_reasons(crp_eval):
    crp_eval("--bootstrap_samples", "50", mitigation=["dfr", "erm_head"])
    doc = _strict_load(crp_eval.last_output)
    metrics, nulls = doc["metrics"], doc["robust"]["null_values"]
    assert metrics["acc5"] is None and metrics["zeroshot/acc5"] is None and metrics["dfr/acc5"] is None
    assert "fewer than 5 classes" in nulls["acc5"]
    assert not any(k.startswith(("zeroshot/", "dfr/")) for k in nulls)  # one reason per quantity, not per method
    for key, value in metrics.items():  # every null is explained
        if value is None:
            relative = key.split("/", 1)[1] if key.split("/", 1)[0] in doc["robust"]["methods"] else key
            assert relative in nulls, key
    # the new group scores are there, with intervals
    assert metrics["dfr/worst_group_ece_ci_low"] <= metrics["dfr/worst_group_ece"] <= metrics["dfr/worst_group_ece_ci_high"]
    assert "zeroshot/auroc" in metrics and "zeroshot/worst_group_f1" in metrics


def test_standard_json_replaces_every_non_finite_float():
    dump = {"metrics": {"m/acc5": math.nan, "m/group_acc/g": math.nan, "acc1": 0.5},
            "robust": {"methods": {"m": {"hyperparameters": {"threshold": math.inf, "curve": [1.0, -math.inf]}}}}}
    clean = standard_json(dump)
    text = json.dumps(clean, allow_nan=False)  # would raise on any NaN or infinity
    assert json.loads(text)["metrics"] == {"m/acc5": None, "m/group_acc/g": None, "acc1": 0.5}
    nulls = clean["robust"]["null_values"]
    assert set(nulls) == {"acc5", "group_acc/g", "robust.methods.m.hyperparameters.threshold",
                          "robust.methods.m.hyperparameters.curve.1"}
    assert "'g' has no samples" in nulls["group_acc/g"] and "inf" in nulls["robust.methods.m.hyperparameters.threshold"]
    assert math.isnan(dump["metrics"]["m/acc5"])  # the in-memory results keep NaN for arithmetic
