"""The extraction's thread budget: decoding workers and forward threads for the cores."""

from __future__ import annotations

import json

import pytest
import torch

from clip_robust_plugins.features import extractor as extractor_module
from clip_robust_plugins.features import threads
from clip_robust_plugins.features.threads import default_workers, fetched_with, thread_budget, torch_threads


def _expected_cpu_workers(cores: int) -> int:
    """The documented CPU rule, written out independently: serial decode below 4 cores,
    then one worker per 8 cores (at least one)."""
    if cores <= 3:
        return 0
    return max(1, cores // 8)


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 7, 8, 15, 16, 17, 64])
def test_cpu_rule_never_oversubscribes(cores):
    budget = thread_budget(cores, "cpu")
    assert budget.workers == _expected_cpu_workers(cores)
    assert budget.threads == max(1, cores - budget.workers)
    assert budget.workers + budget.threads <= max(cores, 1 + budget.workers)
    assert not budget.explicit_workers


@pytest.mark.parametrize("cores,workers", [(1, 0), (2, 1), (8, 7), (16, 15), (32, 16)])
def test_cuda_rule_keeps_a_core_for_the_feeding_process(cores, workers):
    budget = thread_budget(cores, "cuda:0")
    assert budget.workers == workers
    assert budget.threads == max(1, cores - workers)


@pytest.mark.parametrize("cores,given", [(2, 0), (2, 4), (16, 3), (1, 2)])
def test_explicit_num_workers_is_kept(cores, given):
    budget = thread_budget(cores, "cpu", given)
    assert budget.workers == given
    assert budget.threads == max(1, cores - given)
    assert budget.explicit_workers


def test_negative_workers_rejected():
    with pytest.raises(ValueError, match="num_workers"):
        thread_budget(2, "cpu", -1)


def test_torch_threads_restores_the_callers_setting():
    saved = torch.get_num_threads()
    other = 1 if saved != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == saved
    with pytest.raises(RuntimeError), torch_threads(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == saved


def _run_eval(run_cli, flags, tmp_path, monkeypatch, cores, extra):
    """An in-process eval on ``cores`` (patched) recording the torch threads each forward saw."""
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(extractor_module, "available_cores", lambda: cores)
    seen = []
    forward = extractor_module.FeatureExtractor._forward

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(extractor_module.FeatureExtractor, "_forward", spy)
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    saved = torch.get_num_threads()
    rc, _, err = run_cli("eval", *flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp",
                         "--batch_size", "16", "--no_feature_cache", "--output", str(out), "--quiet", *extra)
    assert rc == 0, err
    assert torch.get_num_threads() == saved  # the budget never leaks out of the pass
    return json.loads(out.read_text())["robust"]["features_extracted"], seen


def test_eval_default_workers_follow_the_cores(run_cli, shapes_flags, tmp_path, monkeypatch):
    records, seen = _run_eval(run_cli, shapes_flags, tmp_path, monkeypatch, cores=3, extra=[])
    assert records and all(r["num_workers"] == default_workers(3, "cpu") == 0 for r in records)
    assert all(r["torch_threads"] == 3 for r in records)
    assert seen and set(seen) == {3}


def test_eval_explicit_num_workers_is_respected(run_cli, shapes_flags, tmp_path, monkeypatch):
    records, seen = _run_eval(run_cli, shapes_flags, tmp_path, monkeypatch, cores=3, extra=["--num_workers", "1"])
    assert records and all(r["num_workers"] == 1 and r["torch_threads"] == 2 for r in records)
    assert seen and set(seen) == {2}


def test_fetched_with_produces_each_item_with_its_threads():
    saved = torch.get_num_threads()
    other = 1 if saved != 1 else 2
    produced, consumed = [], []

    def items():
        for i in range(3):
            produced.append(torch.get_num_threads())
            yield i

    for i in fetched_with(items(), other):
        consumed.append((i, torch.get_num_threads()))
    assert produced == [other] * 3
    assert consumed == [(0, saved), (1, saved), (2, saved)]

    def failing():
        yield 0
        raise OSError("bad shard")

    with pytest.raises(OSError, match="bad shard"):
        list(fetched_with(failing(), other))
    assert torch.get_num_threads() == saved
