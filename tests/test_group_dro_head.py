"""group_dro_head: its group weights against a hand-run numpy GroupDRO, and one CLI run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clip_robust_plugins.mitigations.heads.group_dro import GroupDROConfig, GroupDROHead, group_dro


def numpy_group_dro(x, y, g, n_classes, n_groups, eta, lr, wd, steps, momentum=0.9):
    """Full-batch GroupDRO written out by hand: per-group mean CE, q <- q exp(eta l) / sum, SGD with momentum."""
    n, d = x.shape
    W, b = np.zeros((n_classes, d)), np.zeros(n_classes)
    counts = np.bincount(g, minlength=n_groups).astype(float)
    q = (counts > 0) / (counts > 0).sum()
    bufs = None
    for _ in range(steps):
        z = x @ W.T + b
        z = z - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        ce = -np.log(p[np.arange(n), y])
        losses = np.array([ce[g == k].mean() if counts[k] else 0.0 for k in range(n_groups)])
        q = q * np.exp(eta * losses)
        q = q / q.sum()
        dz = (p - np.eye(n_classes)[y]) * (q[g] / counts[g])[:, None]
        grads = (dz.T @ x + wd * W, dz.sum(0))
        bufs = grads if bufs is None else tuple(momentum * bu + gr for bu, gr in zip(bufs, grads))
        W, b = W - lr * bufs[0], b - lr * bufs[1]
    return W, b, q


def test_group_weights_after_k_steps_match_a_hand_run_update():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    y = rng.integers(0, 2, size=30)
    g = np.where(np.arange(30) < 5, 2, y)  # a small third group, group 3 empty
    cfg = GroupDROConfig(eta=0.5, lr=0.2, steps=7, weight_decay=0.01)
    W, b, q = group_dro(x, y, g, 2, 4, cfg)
    W_ref, b_ref, q_ref = numpy_group_dro(x, y, g, 2, 4, 0.5, 0.2, 0.01, 7)
    np.testing.assert_allclose(q.numpy(), q_ref, rtol=1e-10)
    np.testing.assert_allclose(W.numpy(), W_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-9, atol=1e-12)
    assert q_ref[3] == 0.0 and not np.allclose(q_ref[:3], 1 / 3)  # the weights really moved


def test_the_head_records_its_final_group_weights_and_rejects_bad_settings():
    x = np.eye(4)
    y, g = np.array([0, 1, 0, 1]), np.array([0, 1, 2, 3])
    fs = SimpleNamespace(features=torch.tensor(x, dtype=torch.float32),
                         y=torch.tensor(y), group_ids=lambda: torch.tensor(g))
    schema = SimpleNamespace(n_groups=lambda: 4, group_names=lambda: ["a", "b", "c", "d"])
    ctx = SimpleNamespace(features=lambda split: fs, n_classes=2, schema=schema)
    head = GroupDROHead(GroupDROConfig(steps=3))
    head.fit(ctx)
    _, _, q = group_dro(x, y, g, 2, 4, GroupDROConfig(steps=3))
    hp = head.hyperparameters()
    assert hp["fit_split"] == "train" and hp["eta"] == 0.01
    assert hp["final_group_weights"] == {n: round(float(w), 6) for n, w in zip("abcd", q)}
    with pytest.raises(ValueError, match="group_dro_head: needs steps >= 1"):
        GroupDROHead(GroupDROConfig(steps=0)).check(ctx)


def test_group_dro_head_runs_end_to_end(run_cli, shapes_flags, tmp_path):
    out = tmp_path / "r.json"
    rc, stdout, stderr = run_cli("eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes",
                                 "--num_workers", "0", "--mitigation", "group_dro_head", "--group_dro_steps", "50",
                                 "--output", out, "--quiet")
    assert rc == 0, stderr
    dump = json.loads(out.read_text())
    method = dump["robust"]["methods"]["group_dro_head"]
    assert method["needs"]["labels"] == ["class", "group"] and method["needs"]["fit_splits"] == ["train"]
    weights = method["hyperparameters"]["final_group_weights"]
    assert len(weights) == 4 and sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= dump["metrics"]["group_dro_head/worst_group_acc"] <= 1.0
