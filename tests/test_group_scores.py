"""Calibration, precision/F1 and AUROC per group against scikit-learn and a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, roc_auc_score

from clip_robust_plugins.group_scores import GroupScoresConfig, confidence_bins, group_scores, weighted_auroc
from clip_robust_plugins.groups import Field, GroupSchema, two_field_schema
from clip_robust_plugins.specs import Predictions


def _predictions(logits, y, a, schema=None, split="test"):
    schema = schema or two_field_schema(["cat", "dog"], ["in", "out"])
    fields = np.stack([np.asarray(y), np.asarray(a)], axis=1)
    logits = np.asarray(logits, dtype=np.float64)
    return Predictions("m", split, tuple(map(str, range(len(y)))), logits.argmax(1), fields, schema, logits)


def _two_class_logits(p1):
    """Logits whose softmax is (1 - p1, p1)."""
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([np.log(1 - p1), np.log(p1)], axis=1)


NO_BOOT = GroupScoresConfig(bootstrap_samples=0)


def test_ece_by_hand():
    # group y:cat_a:in holds 4 cats with P(dog) 0.1, 0.2, 0.3, 0.7: confidences 0.9, 0.8, 0.7, 0.7,
    # right, right, right, wrong.  15 bins of width 1/15: 0.9 -> bin 13, 0.8 -> bin 11, 0.7 -> bin 10.
    # ECE = (|1 - 0.9| + |1 - 0.8| + |1 + 0 - 1.4|) / 4 = (0.1 + 0.2 + 0.4) / 4 = 0.175
    p1 = [0.1, 0.2, 0.3, 0.7, 0.6, 0.95]
    y = [0, 0, 0, 0, 1, 1]
    a = [0, 0, 0, 0, 1, 1]
    out = group_scores(_predictions(_two_class_logits(p1), y, a), NO_BOOT)
    assert list(confidence_bins(np.array([0.9, 0.8, 0.7, 1.0, 0.0, 1 / 15]), 15)) == [13, 11, 10, 14, 0, 0]
    assert out["group_ece/y:cat_a:in"] == pytest.approx(0.175, abs=1e-12)
    # group y:dog_a:out: confidences 0.6 (bin 8) and 0.95 (bin 14), both right: (0.4 + 0.05) / 2
    assert out["group_ece/y:dog_a:out"] == pytest.approx(0.225, abs=1e-12)
    assert out["worst_group_ece"] == pytest.approx(0.225) and out["worst_group_ece_name"] == "y:dog_a:out"
    # the whole split, bin by bin: bin 10 (0.7, right and wrong: |1 - 1.4|), 11, 13, 8, 14
    assert out["ece"] == pytest.approx((0.4 + 0.2 + 0.1 + 0.4 + 0.05) / 6, abs=1e-12)
    assert math.isnan(out["group_ece/y:cat_a:out"])  # empty group


def _random_case(seed=0, n=300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < 0.8, y, 1 - y)
    p1 = np.clip(0.15 + 0.5 * y + 0.25 * a + rng.normal(0, 0.15, n), 0.01, 0.99)
    p1[:20] = 0.5  # ties
    return _two_class_logits(p1), y, a, p1


def test_precision_f1_and_auroc_equal_sklearn():
    logits, y, a, p1 = _random_case()
    out = group_scores(_predictions(logits, y, a), NO_BOOT)
    pred = logits.argmax(1)
    for c, cname in enumerate(["cat", "dog"]):
        for v, vname in enumerate(["in", "out"]):
            s = a == v  # the slice: class c's precision among samples with this attribute value
            want_p = precision_score(y[s], pred[s], labels=[c], average=None, zero_division=0)[0]
            want_f = f1_score(y[s], pred[s], labels=[c], average=None, zero_division=0)[0]
            assert out[f"group_precision/y:{cname}_a:{vname}"] == pytest.approx(want_p, abs=1e-12)
            assert out[f"group_f1/y:{cname}_a:{vname}"] == pytest.approx(want_f, abs=1e-12)
    per_class_p = precision_score(y, pred, average=None, zero_division=0)
    per_class_f = f1_score(y, pred, average=None, zero_division=0)
    assert out["worst_class_precision"] == pytest.approx(per_class_p.min(), abs=1e-12)
    assert out["worst_class_f1"] == pytest.approx(per_class_f.min(), abs=1e-12)
    groups_p = [out[k] for k in out if k.startswith("group_precision/")]
    assert out["worst_group_precision"] == pytest.approx(min(groups_p))
    assert out["auroc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    for v, vname in enumerate(["in", "out"]):
        assert out[f"auroc/a:{vname}"] == pytest.approx(roc_auc_score(y[a == v], p1[a == v]), abs=1e-12)
    assert out["worst_auroc"] == pytest.approx(min(out["auroc/a:in"], out["auroc/a:out"]))


def test_a_grouping_without_the_class_field_takes_sklearns_macro_average():
    logits, y, a, p1 = _random_case(seed=1)
    schema = GroupSchema((Field("y", ("cat", "dog")), Field("a", ("in", "out"))), "y", {"default": ("a",)})
    out = group_scores(_predictions(logits, y, a, schema), NO_BOOT)
    pred = logits.argmax(1)
    for v, vname in enumerate(["in", "out"]):
        s = a == v
        assert out[f"group_precision/a:{vname}"] == pytest.approx(
            precision_score(y[s], pred[s], average="macro", zero_division=0), abs=1e-12)
        assert out[f"group_f1/a:{vname}"] == pytest.approx(f1_score(y[s], pred[s], average="macro", zero_division=0),
                                                           abs=1e-12)
        assert out[f"auroc/a:{vname}"] == pytest.approx(roc_auc_score(y[s], p1[s]), abs=1e-12)


def test_weighted_auroc_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(2)
    score = rng.integers(0, 6, 80) / 5.0  # many ties
    positive = rng.random(80) < 0.4
    weights = rng.integers(0, 4, size=(3, 80)).astype(float)
    got = weighted_auroc(score, positive, weights)
    for row, value in zip(weights, got):
        assert value == pytest.approx(roc_auc_score(positive, score, sample_weight=row), abs=1e-12)
    assert math.isnan(weighted_auroc(score, np.ones(80, bool), weights[:1])[0])  # one class only


def test_intervals_contain_the_estimates_and_follow_the_seed():
    logits, y, a, _ = _random_case(seed=3)
    p = _predictions(logits, y, a)
    config = GroupScoresConfig(bootstrap_samples=200, ci_level=0.9)
    first, again, other = group_scores(p, config, seed=1), group_scores(p, config, seed=1), group_scores(p, config, seed=2)
    assert first == again and first != other
    for key in ("worst_group_ece", "ece", "worst_group_precision", "worst_group_f1", "worst_class_f1", "auroc",
                "worst_auroc", "group_ece/y:dog_a:in", "auroc/a:out"):
        head, _, tail = key.partition("/")
        low = first[f"{head}_ci_low" + (f"/{tail}" if tail else "")]
        high = first[f"{head}_ci_high" + (f"/{tail}" if tail else "")]
        assert low <= first[key] <= high and low < high, key


def test_a_method_without_logits_gets_precision_but_no_calibration():
    logits, y, a, _ = _random_case(seed=4)
    p = _predictions(logits, y, a)
    p = Predictions(p.method, p.split, p.keys, p.pred, p.fields, p.schema, None)
    out = group_scores(p, NO_BOOT)
    assert "worst_group_precision" in out and not any("ece" in k or "auroc" in k for k in out)
