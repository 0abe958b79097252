"""Confidence intervals: Wilson against its formula, the bootstrap against a slow loop over the
documented index resamples, independence from the other methods, containment, determinism,
edge cases, and the keys in a real results JSON."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from clip_robust_plugins.intervals import (
    BOOTSTRAP_STATS,
    CHUNK,
    DELTA_STATS,
    Resampler,
    add_intervals,
    add_method_intervals,
    bootstrap_replicates,
    group_statistics,
    interval_config,
    method_intervals,
    stream_key,
    wilson_interval,
    z_value,
)
from clip_robust_plugins.metrics import group_metrics
from clip_robust_plugins.plugins import PluginError
from clip_robust_plugins.results import EvalResult, MethodResult

NAMES = ["g0", "g1", "g2", "g3", "g4"]


def _wilson_direct(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_equals_the_formula(level):
    z = z_value(level)
    assert z == pytest.approx({0.9: 1.6448536, 0.95: 1.9599640, 0.99: 2.5758293}[level], abs=1e-6)
    ks, ns = np.array([0, 1, 3, 8, 10, 97, 642]), np.array([1, 1, 7, 10, 10, 180, 642])
    low, high = wilson_interval(ks, ns, level)
    for k, n, lo, hi in zip(ks, ns, low, high):
        want = _wilson_direct(int(k), int(n), z)
        assert lo == pytest.approx(max(want[0], 0.0), abs=1e-12) and hi == pytest.approx(min(want[1], 1.0), abs=1e-12)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    # the textbook example: 8 of 10 at 95 % -> [0.490, 0.943]
    lo, hi = wilson_interval(8, 10, 0.95)
    assert (round(float(lo), 3), round(float(hi), 3)) == (0.490, 0.943)


def test_wilson_of_an_empty_group_is_nan():
    low, high = wilson_interval([0, 2], [0, 4])
    assert math.isnan(low[0]) and math.isnan(high[0]) and 0 < low[1] < 0.5 < high[1] < 1


def _data(seed: int = 0, sizes=(40, 25, 0, 15, 1), p=((0.9, 0.6, 0.5, 0.8, 1.0), (0.85, 0.75, 0.5, 0.7, 1.0))):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(groups)
    correct = np.stack([rng.random(groups.size) < np.asarray(pm)[groups] for pm in p])
    return correct, groups


def test_group_statistics_equal_group_metrics():
    """The bootstrap's statistics are the metrics' own definitions (on any hit counts)."""
    rng = np.random.default_rng(1)
    sizes = np.array([5, 3, 7, 1])
    train = np.array([50, 5, 2, 30])
    for _ in range(20):
        hits = rng.integers(0, sizes + 1)
        groups = np.repeat(np.arange(4), sizes)
        pred = np.concatenate([np.r_[np.ones(h), np.zeros(n - h)] for h, n in zip(hits, sizes)]).astype(int)
        m = group_metrics(pred, np.ones_like(pred), groups, NAMES[:4], train)
        s = group_statistics(hits.astype(float), sizes.astype(float), train.astype(float))
        for key in BOOTSTRAP_STATS:
            assert float(s[key]) == pytest.approx(m[key], abs=1e-12), key


def _reference_replicates(correct, groups, train, n_boot, seed, split="test"):
    """The slow loop: resample sample *indices* within each group from the documented stream
    (``default_rng(stream_key(seed, split) + [g, chunk])``), recompute with group_metrics."""
    members = [np.flatnonzero(groups == g) for g in range(len(NAMES))]
    draws = {}
    for g, ix in enumerate(members):
        if ix.size:
            blocks = [np.random.default_rng([*stream_key(seed, split), g, c]).integers(
                0, ix.size, size=(min(CHUNK, n_boot - c * CHUNK), ix.size)) for c in range(math.ceil(n_boot / CHUNK))]
            draws[g] = np.concatenate(blocks)
    out = {s: np.empty((n_boot, correct.shape[0])) for s in BOOTSTRAP_STATS}
    for b in range(n_boot):
        idx = np.concatenate([members[g][draws[g][b]] for g in sorted(draws)])
        for m in range(correct.shape[0]):
            values = group_metrics(correct[m, idx].astype(int), np.ones(idx.size, int), groups[idx], NAMES, train)
            for s in BOOTSTRAP_STATS:
                out[s][b, m] = values[s]
    return out


def test_bootstrap_equals_a_slow_loop_over_resampled_indices():
    correct, groups = _data()
    train = [300, 20, 5, 10, 2]
    n_boot = 70  # three chunks, the last one short
    fast = bootstrap_replicates(Resampler(groups, len(NAMES), n_boot, 7, "test"), correct, train)
    slow = _reference_replicates(correct, groups, train, n_boot, seed=7)
    for stat in BOOTSTRAP_STATS:
        np.testing.assert_allclose(fast[stat], slow[stat], rtol=0, atol=1e-12, err_msg=stat)
    assert np.ptp(fast["worst_group_acc"][:, 0]) > 0  # the resamples differ


def test_resample_counts_are_within_group_draws_with_replacement():
    _, groups = _data()
    r = Resampler(groups, len(NAMES), 1000, 0, "test")
    for g in r.present:
        counts = np.concatenate([r.group_counts(int(g), c) for c in range(math.ceil(1000 / CHUNK))])
        assert counts.shape == (1000, r.sizes[g]) and (counts.sum(axis=1) == r.sizes[g]).all()
        if r.sizes[g] > 1:  # each member is drawn once per resample on average, Binomial(n, 1/n) spread
            assert counts.mean() == pytest.approx(1.0, abs=0.05)
            assert counts.var() == pytest.approx(1 - 1 / r.sizes[g], rel=0.1)


def test_a_methods_intervals_do_not_depend_on_the_other_methods():
    correct, groups = _data(p=((0.9, 0.6, 0.5, 0.8, 1.0), (0.85, 0.75, 0.5, 0.7, 1.0), (0.5, 0.5, 0.5, 0.5, 0.5)))
    train = [300, 20, 5, 10, 2]
    two = method_intervals(correct[:2], groups, NAMES, train, 300, 0.95, 3, ["zeroshot", "dfr"])
    three = method_intervals(correct, groups, NAMES, train, 300, 0.95, 3, ["zeroshot", "dfr", "cfr"])
    assert _same(two, three[:2])  # zero-shot's and dfr's keys, deltas included, are identical
    other_split = method_intervals(correct[:2], groups, NAMES, train, 300, 0.95, 3, ["zeroshot", "dfr"], split="val")
    assert not _same(two, other_split)  # the split enters the stream


def _same(a: list[dict], b: list[dict]) -> bool:
    """Equal key for key, NaN equal to NaN."""
    return all(x.keys() == y.keys() and all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])) for k in x)
               for x, y in zip(a, b))


def test_intervals_contain_the_estimates_and_follow_the_seed():
    correct, groups = _data(seed=3)
    train = [300, 20, 5, 10, 2]
    a = method_intervals(correct, groups, NAMES, train, 500, 0.95, 11, ["zeroshot", "m"])
    b = method_intervals(correct, groups, NAMES, train, 500, 0.95, 11, ["zeroshot", "m"])
    c = method_intervals(correct, groups, NAMES, train, 500, 0.95, 12, ["zeroshot", "m"])
    assert _same(a, b) and not _same(a, c)
    for m in range(2):
        est = group_metrics(correct[m].astype(int), np.ones(groups.size, int), groups, NAMES, train)
        for stat in BOOTSTRAP_STATS:
            assert a[m][f"{stat}_ci_low"] <= est[stat] <= a[m][f"{stat}_ci_high"], stat
        for name in NAMES:
            if name == "g2":  # empty
                assert math.isnan(a[m][f"group_acc_ci_low/{name}"]) and math.isnan(est[f"group_acc/{name}"])
            else:
                assert a[m][f"group_acc_ci_low/{name}"] <= est[f"group_acc/{name}"] <= a[m][f"group_acc_ci_high/{name}"]
    # the one-sample group g4 (always right) never moves: the worst group stays among the others
    assert a[0]["worst_group_acc_ci_low"] < a[0]["worst_group_acc_ci_high"]
    for stat in DELTA_STATS:
        delta = a[1][f"delta_{stat}_vs_zeroshot"]
        assert a[1][f"delta_{stat}_vs_zeroshot_ci_low"] <= delta <= a[1][f"delta_{stat}_vs_zeroshot_ci_high"]
    assert not any(k.startswith("delta_") for k in a[0])


def test_identical_methods_have_a_zero_width_paired_difference():
    correct, groups = _data(seed=4)
    same = np.stack([correct[0], correct[0]])
    out = method_intervals(same, groups, NAMES, None, 300, 0.95, 0, ["zeroshot", "copy"])
    assert out[1]["delta_worst_group_acc_vs_zeroshot_ci_low"] == out[1]["delta_worst_group_acc_vs_zeroshot_ci_high"] == 0
    assert out[0]["worst_group_acc_ci_low"] < out[0]["worst_group_acc_ci_high"]  # unpaired spread is not zero
    assert math.isnan(out[0]["acc_train_weighted_ci_low"])  # no training counts: NaN, not an error


def test_zero_bootstrap_samples_gives_wilson_only():
    correct, groups = _data()
    out = method_intervals(correct, groups, NAMES, None, 0, 0.95, 0, ["zeroshot", "m"])
    assert "group_acc_ci_low/g0" in out[1] and "worst_group_acc_ci_low" not in out[1]


def _result(correct, groups, y=None):
    y = np.zeros(groups.size, dtype=int) if y is None else y
    methods = [MethodResult(name, None, np.where(c, y, 1 - y), {}) for name, c in zip(["zeroshot", "dfr", "cfr"], correct)]
    for m in methods:
        m.metrics.update(group_metrics(m.pred, y, groups, NAMES, [300, 20, 5, 10, 2]))
    dump = {"metrics": {f"{m.name}/{k}": v for m in methods for k, v in m.metrics.items()},
            "robust": {"baseline": "zeroshot"}}
    return EvalResult(dump=dump, keys=tuple(map(str, range(groups.size))), y=y, group_names=NAMES, groups=groups,
                      methods=methods)


def test_add_intervals_fills_every_method_and_the_flat_json():
    correct, groups = _data(p=((0.9, 0.6, 0.5, 0.8, 1.0), (0.85, 0.75, 0.5, 0.7, 1.0), (0.5, 0.5, 0.5, 0.5, 0.5)))
    result = _result(correct, groups)
    add_intervals(result, 200, 0.9, 5, train_counts=[300, 20, 5, 10, 2])
    flat = result.dump["metrics"]
    for m in ("zeroshot", "dfr", "cfr"):
        for key in ("worst_group_acc", "acc", "acc_train_weighted", "acc_group_mean"):
            assert flat[f"{m}/{key}_ci_low"] <= flat[f"{m}/{key}"] <= flat[f"{m}/{key}_ci_high"]
        assert f"{m}/group_acc_ci_high/g3" in flat
    for m in ("dfr", "cfr"):
        for key in ("worst_group_acc", "acc", "acc_train_weighted", "acc_group_mean"):
            delta = flat[f"{m}/delta_{key}_vs_zeroshot"]
            assert delta == pytest.approx(flat[f"{m}/{key}"] - flat[f"zeroshot/{key}"], abs=1e-12)
            assert flat[f"{m}/delta_{key}_vs_zeroshot_ci_low"] <= delta <= flat[f"{m}/delta_{key}_vs_zeroshot_ci_high"]
    assert result.dump["robust"]["intervals"]["bootstrap_samples"] == 200
    assert result.dump["robust"]["intervals"]["ci_level"] == 0.9
    # the per-method metrics hold the same keys (the printed table reads them)
    assert result.methods[1].metrics["delta_worst_group_acc_vs_zeroshot"] == flat["dfr/delta_worst_group_acc_vs_zeroshot"]


def test_add_method_intervals_checks_the_training_counts():
    correct, groups = _data()
    result = _result(correct, groups)
    with pytest.raises(ValueError, match="training group counts"):
        add_method_intervals(result.methods, result.y, groups, NAMES, train_counts=[1, 2])


def test_interval_config_defaults_and_flags():
    unset = argparse.Namespace(bootstrap_samples=None, ci_level=None)  # flags declared, not given
    assert interval_config(unset).bootstrap_samples == 1000
    assert interval_config(unset).ci_level == 0.95
    with pytest.raises(PluginError, match="--ci_level"):  # never declared: an error, not a default
        interval_config(argparse.Namespace(bootstrap_samples=None))
    cfg = interval_config(argparse.Namespace(bootstrap_samples=50, ci_level=None))
    assert (cfg.bootstrap_samples, cfg.ci_level) == (50, 0.95)


def test_real_results_json_has_the_interval_keys_for_every_method(crp_eval):
    first = crp_eval("--bootstrap_samples", "300", "--ci_level", "0.9", "--seed", "3", mitigation=["erm_head"])
    metrics, groups = first["metrics"], first["robust"]["groups"]
    assert first["robust"]["intervals"]["bootstrap_samples"] == 300 and first["robust"]["intervals"]["ci_level"] == 0.9
    for method in first["robust"]["methods"]:
        for key in ("worst_group_acc", "acc", "acc_train_weighted", "acc_group_mean"):
            assert metrics[f"{method}/{key}_ci_low"] <= metrics[f"{method}/{key}"] <= metrics[f"{method}/{key}_ci_high"]
        for group in groups:
            low, high = metrics[f"{method}/group_acc_ci_low/{group}"], metrics[f"{method}/group_acc_ci_high/{group}"]
            assert low <= metrics[f"{method}/group_acc/{group}"] <= high
    delta = "erm_head/delta_worst_group_acc_vs_zeroshot"
    assert metrics[delta + "_ci_low"] <= metrics[delta] <= metrics[delta + "_ci_high"]
    assert "zeroshot/delta_worst_group_acc_vs_zeroshot" not in metrics


def test_table_prints_intervals_where_they_fit():
    from clip_robust_plugins.run_output import format_table

    correct, groups = _data(p=((0.9, 0.6, 0.5, 0.8, 1.0), (0.85, 0.75, 0.5, 0.7, 1.0), (0.5, 0.5, 0.5, 0.5, 0.5)))
    result = _result(correct, groups)
    result.dump.update(dataset="robust/x", model="m", pretrained="p")
    result.dump["robust"]["split"] = "test"
    plain = format_table(result)
    assert "[" not in plain.split("\n", 1)[1]  # below the title "robust/x [test] ..."
    add_intervals(result, 100, 0.95, 0, train_counts=[300, 20, 5, 10, 2])
    table = format_table(result)
    wga = result.methods[1].metrics
    assert f"{wga['worst_group_acc']:.3f} [{wga['worst_group_acc_ci_low']:.3f}, {wga['worst_group_acc_ci_high']:.3f}]" in table
    assert "worst - zeroshot" in table and "95% intervals" in table
    narrow = format_table(result, width=60)
    assert "[" not in narrow.replace("[low", "").split("\n", 1)[1] and "left out to fit 60 columns" in narrow


def test_adding_a_method_leaves_the_others_intervals_unchanged_through_the_cli(crp_eval):
    alone = crp_eval("--bootstrap_samples", "200", "--seed", "2", mitigation=["dfr"])["metrics"]
    more = crp_eval("--bootstrap_samples", "200", "--seed", "2", mitigation=["dfr", "erm_head"])["metrics"]
    for method in ("zeroshot", "dfr"):
        keys = {k: v for k, v in alone.items() if k.startswith(method + "/")}
        intervals = [k for k in keys if "_ci_" in k]
        assert len(intervals) > 20 and "dfr/delta_worst_group_acc_vs_zeroshot_ci_low" in alone
        assert {k: more[k] for k in keys} == keys  # point values, intervals and paired differences alike
    assert "erm_head/worst_group_acc_ci_low" in more
