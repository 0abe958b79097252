import argparse
import math

import numpy as np
import pytest
import torch

from clip_robust_plugins.compat import accuracy as fixed_clip_benchmark_accuracy
from clip_robust_plugins.groups import two_field_schema
from clip_robust_plugins.intervals import interval_config
from clip_robust_plugins.metrics import (
    _clip_benchmark_metric,
    _group_metric,
    class_metrics,
    group_metrics,
    null_reason,
    rates,
    topk_accuracies,
    worst_group_accuracy,
)
from clip_robust_plugins.specs import Predictions

NAMES = ["g0", "g1", "g2", "g3"]


def test_group_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    groups = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    pred = np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1])
    m = group_metrics(pred, y, groups, NAMES, train_counts=[70, 10, 10, 10])
    assert m["group_acc/g0"] == 1.0 and m["group_acc/g1"] == 0.5
    assert m["group_acc/g2"] == pytest.approx(1 / 3) and m["group_acc/g3"] == 1.0
    assert m["group_count/g2"] == 3.0
    assert m["acc"] == pytest.approx(7 / 10)
    assert m["worst_group_acc"] == pytest.approx(1 / 3) and m["worst_group_name"] == "g2"
    assert m["acc_group_mean"] == pytest.approx((1 + 0.5 + 1 / 3 + 1) / 4)
    assert m["acc_train_weighted"] == pytest.approx(0.7 * 1 + 0.1 * 0.5 + 0.1 / 3 + 0.1 * 1)
    assert m["gap_sample_mean"] == pytest.approx(0.7 - 1 / 3) and "gap" not in m
    assert m["gap_train_weighted"] == pytest.approx(m["acc_train_weighted"] - 1 / 3)
    for key, value in m.items():
        if isinstance(value, float) and key.startswith(("acc", "group_acc", "worst_group_acc")):
            assert 0.0 <= value <= 1.0


def test_empty_group_has_count_zero_and_is_not_the_worst():
    y = np.array([0, 0, 1, 1])
    groups = np.array([0, 0, 2, 3])
    pred = np.array([0, 1, 1, 1])
    m = group_metrics(pred, y, groups, NAMES, train_counts=[1, 1000, 1, 2])
    assert m["group_count/g1"] == 0.0 and math.isnan(m["group_acc/g1"])
    assert m["worst_group_name"] == "g0" and m["worst_group_acc"] == 0.5
    assert m["acc_group_mean"] == pytest.approx((0.5 + 1 + 1) / 3)
    # the empty group's large training share is dropped and the rest renormalised
    assert m["acc_train_weighted"] == pytest.approx((1 * 0.5 + 1 * 1 + 2 * 1) / 4)


def test_class_metrics():
    m = class_metrics(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 2]), n_classes=4)
    assert m["worst_class_acc"] == 0.5
    assert m["balanced_acc"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_topk_matches_clip_benchmark_definition_including_ties():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (200, 6), generator=gen).float()  # many ties
    target = torch.randint(0, 6, (200,), generator=gen)
    expected = fixed_clip_benchmark_accuracy(logits, target, topk=(1, 5))
    assert topk_accuracies(logits.numpy(), target.numpy(), (1, 5)) == expected
    assert topk_accuracies(logits.numpy(), target.numpy(), (1,)) == fixed_clip_benchmark_accuracy(logits, target)


def test_registered_metric_functions_on_predictions():
    schema = two_field_schema(["a", "b"], ["x", "y"], split_counts={"train": [5, 1, 1, 5]})
    fields = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    logits = np.array([[2.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    p = Predictions("m", "test", ("k0", "k1", "k2", "k3"), logits.argmax(1), fields, schema, logits)
    g = _group_metric(p)
    assert g["worst_group_name"] == "y:a_a:y" and g["worst_group_acc"] == 0.0
    assert g["acc_train_weighted"] == pytest.approx(11 / 12)
    c = _clip_benchmark_metric(p)
    assert c["acc1"] == 0.75 and math.isnan(c["acc5"]) and c["mean_per_class_recall"] == 0.75


def test_worst_group_accuracy_matches_group_metrics():
    y = np.array([0, 0, 1, 1, 1])
    groups = np.array([0, 0, 2, 2, 3])
    pred = np.array([0, 1, 1, 0, 0])
    assert worst_group_accuracy(pred, y, groups) == group_metrics(pred, y, groups, NAMES)["worst_group_acc"] == 0.0
    assert math.isnan(worst_group_accuracy(np.array([], int), np.array([], int), np.array([], int)))


def test_interval_flags_are_the_group_scores_metrics_options():
    from clip_robust_plugins.argtypes import add_config_flags
    from clip_robust_plugins.plugins import build_plugin_manager, collect_registry

    spec = collect_registry(build_plugin_manager()).metrics["group_scores"]
    assert spec.options is not None and spec.takes_context and spec.option_prefix == ""
    parser = argparse.ArgumentParser()
    add_config_flags(parser, spec.options, spec.option_prefix)
    assert interval_config(parser.parse_args([])).bootstrap_samples == 1000  # the dataclass holds the defaults
    args = parser.parse_args(["--bootstrap_samples", "0", "--ci_level", "0.9", "--ece_bins", "10"])
    assert (interval_config(args).bootstrap_samples, interval_config(args).ci_level) == (0, 0.9)
    assert args.ece_bins == 10
    for bad in (["--ci_level", "1.0"], ["--ci_level", "0"], ["--bootstrap_samples", "-1"], ["--ece_bins", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_rates_is_the_one_per_group_accuracy():
    labels = np.array([0, 0, 2, 2, 2])
    counts, hits, acc = rates(labels, np.array([1, 0, 1, 1, 0]), 4)
    assert list(counts) == [2, 0, 3, 0] and list(hits) == [1, 0, 2, 0]
    assert acc[0] == 0.5 and acc[2] == pytest.approx(2 / 3) and math.isnan(acc[1]) and math.isnan(acc[3])


def test_null_reasons_name_the_cause():
    assert "fewer than 5 classes" in null_reason("acc5")
    assert "training-split group counts" in null_reason("acc_train_weighted_ci_low")
    assert "'y:a_a:x' has no samples" in null_reason("group_acc_ci_high/y:a_a:x")
    assert "both classes" in null_reason("auroc/a:x")
