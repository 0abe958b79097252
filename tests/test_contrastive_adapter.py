"""Contrastive adapter: the loss, the hard negatives and positives against direct computations; the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from clip_robust_plugins.mitigations.contrastive_adapter.training import (
    Adapter,
    adapter_logits,
    contrastive_loss,
    hard_negatives,
    sample_positives,
)


def test_hard_negatives_are_the_nearest_other_class_samples():
    rng = np.random.default_rng(0)
    x = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(30, 5)), dtype=torch.float32), dim=-1)
    y = rng.integers(0, 3, 30)
    got = hard_negatives(x, y, 4, pool=1000, rng=np.random.default_rng(1))  # pool >= N: every sample
    sims = (x @ x.T).numpy()
    for i in range(30):
        other = np.flatnonzero(y != y[i])
        expected = other[np.argsort(-sims[i, other], kind="stable")[:4]]
        assert set(got[i].tolist()) == set(expected.tolist())
    small = hard_negatives(x, y, 4, pool=10, rng=np.random.default_rng(1))  # a pool: only its members
    assert np.isin(small[small >= 0], np.sort(np.random.default_rng(1).choice(30, 10, replace=False))).all()


def test_positives_prefer_the_same_class_with_another_zero_shot_prediction():
    y = np.array([0, 0, 0, 0, 1, 1])
    zs = np.array([0, 0, 1, 1, 1, 1])
    pos = sample_positives(y, zs, 3, np.random.default_rng(0))
    assert set(pos[:2].ravel()) <= {2, 3} and set(pos[2:4].ravel()) <= {0, 1}
    assert set(pos[4:].ravel()) <= {4, 5}  # no other prediction in class 1: any same-class sample


def test_loss_matches_a_loop_over_anchors():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=gen)
    y = torch.tensor([0, 1, 2] * 4)
    adapter = Adapter(6, 8, gen)
    with torch.no_grad():
        adapter.fc2.weight.normal_(generator=gen)  # not the identity, so the adapter matters
    text = torch.nn.functional.normalize(torch.randn(3, 6, generator=gen), dim=-1)
    anchors = torch.tensor([0, 1, 2, 3])
    pos = torch.tensor([[3, 6], [4, -1], [5, 8], [0, 9]])
    neg = torch.tensor([[1, 2, -1], [0, 2, 5], [0, 1, 3], [1, -1, -1]])
    adapter.eval()  # BatchNorm with running stats: the loop below sees the same transform per row
    loss = contrastive_loss(adapter, x, y, anchors, pos, neg, text, 0.1)
    with torch.no_grad():
        z = torch.nn.functional.normalize(adapter(x), dim=-1)
    terms = []
    for b, a in enumerate(anchors.tolist()):
        s_pos = [float(z[a] @ text[y[a]]) / 0.1] + [float(z[a] @ z[p]) / 0.1 for p in pos[b].tolist() if p >= 0]
        s_neg = [float(z[a] @ text[c]) / 0.1 for c in range(3) if c != y[a]]
        s_neg += [float(z[a] @ z[n]) / 0.1 for n in neg[b].tolist() if n >= 0]
        neg_sum = sum(math.exp(s) for s in s_neg)
        terms += [-math.log(math.exp(s) / (math.exp(s) + neg_sum)) for s in s_pos]
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-4)


def test_epoch_zero_is_zero_shot():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(20, 6, generator=gen), dim=-1)
    head = torch.nn.functional.normalize(torch.randn(6, 3, generator=gen), dim=0)
    torch.testing.assert_close(adapter_logits(Adapter(6, 8, gen), x, head), 100.0 * x @ head)


@pytest.mark.usefixtures("one_thread")
def test_contrastive_adapter_through_the_cli(run_cli, shapes_flags, tmp_path):
    out = tmp_path / "r.json"
    rc, _, err = run_cli("eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp",
                         "--num_workers", "0", "--quiet", "--feature_cache", tmp_path / "cache", "--output", out,
                         "--plot", "--mitigation", "contrastive_adapter", "--cadapter_epochs", "4",
                         "--cadapter_batch_size", "16", "--cadapter_lr", "0.05")
    assert rc == 0, err
    results = json.loads(out.read_text())
    hp = results["robust"]["methods"]["contrastive_adapter"]["hyperparameters"]
    curve = hp["curve"]
    assert [r["epoch"] for r in curve] == [0, 1, 2, 3, 4] and hp["epochs"] == 4
    best = max(curve, key=lambda r: (r["val_worst_group_acc"], -r["epoch"]))
    assert hp["selection"] == {"criterion": "worst_group_acc", "split": "val", "epoch": best["epoch"],
                               "value": best["val_worst_group_acc"]}
    m = results["metrics"]
    if best["epoch"] == 0:  # the kept epoch is the zero-shot head
        assert m["contrastive_adapter/acc"] == m["zeroshot/acc"]
    assert (tmp_path / "r_contrastive_adapter_curve.png").read_bytes()[:4] == b"\x89PNG"
