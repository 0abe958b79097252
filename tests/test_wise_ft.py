"""WiSE-FT (linear-head form): the curve against logits interpolated by hand, the choice, the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clip_robust_plugins.metrics import worst_group_accuracy
from clip_robust_plugins.mitigations.wise_ft import WiseFTConfig
from clip_robust_plugins.mitigations.wise_ft.linear import WiseFTLinear, finetune_head


class _Features(SimpleNamespace):
    def group_ids(self):
        return self.g


def _ctx(seed: int = 0):
    """Two classes in 4 dims; the zero-shot head is right on 'clean' samples, train labels say more."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, 2, n)
        a = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 4)) * 0.3
        x[:, 0] += np.where(y == 1, 1.0, -1.0)
        x[:, 1] += np.where(a == 1, 1.0, -1.0)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return _Features(features=torch.tensor(x, dtype=torch.float32), y=torch.tensor(y), g=torch.tensor(2 * y + a))

    splits = {"train": split(200), "val": split(100), "test": split(100)}
    head = torch.tensor([[0.0, 0.0], [0.5, -0.5], [0.1, 0.2], [0.0, 0.0]])  # (D, C): a poor zero-shot head
    return SimpleNamespace(features=lambda s: splits[s], zeroshot_head=lambda: head, n_classes=2,
                           torch_generator=lambda salt: torch.Generator().manual_seed(0)), splits, head


def test_curve_and_choice_match_logits_interpolated_by_hand():
    ctx, splits, head = _ctx()
    method = WiseFTLinear(WiseFTConfig(epochs=5))
    method.fit(ctx)
    info = method.hyperparameters()
    zs_coef = 100.0 * head.T
    ft_coef, ft_b, _ = finetune_head(splits["train"].features, splits["train"].y, zs_coef, WiseFTConfig(epochs=5),
                                     torch.Generator().manual_seed(0))
    val = splits["val"]
    zs_logits, ft_logits = val.features @ zs_coef.T, val.features @ ft_coef.T + ft_b
    expected = []
    for a in np.round(np.arange(11) * 0.1, 1):
        pred = ((1 - a) * zs_logits + a * ft_logits).argmax(1).numpy()  # weights are linear: logits interpolate
        expected.append(worst_group_accuracy(pred, val.y.numpy(), val.g.numpy()))
    got = [r["val_worst_group_acc"] for r in info["curve"]]
    assert got == pytest.approx(expected, abs=1e-9)
    assert [r["alpha"] for r in info["curve"]] == pytest.approx(list(np.arange(11) * 0.1))
    best = max(range(11), key=lambda i: (expected[i], -i))
    assert info["alpha"] == pytest.approx(best * 0.1) and info["selection"] == {"criterion": "worst_group", "split": "val"}
    a = info["alpha"]
    test = splits["test"].features
    direct = (1 - a) * (test @ zs_coef.T) + a * (test @ ft_coef.T + ft_b)
    torch.testing.assert_close(method.predict(ctx, "test"), direct, rtol=1e-5, atol=1e-3)


def test_the_fine_tuned_head_lowers_the_train_loss_and_fixed_alpha_reads_no_val():
    ctx, splits, head = _ctx(1)
    tr = splits["train"]
    coef, b, losses = finetune_head(tr.features, tr.y, 100.0 * head.T, WiseFTConfig(epochs=10),
                                    torch.Generator().manual_seed(0))
    loss0 = torch.nn.functional.cross_entropy(tr.features @ (100.0 * head), tr.y)
    loss1 = torch.nn.functional.cross_entropy(tr.features @ coef.T + b, tr.y)
    assert float(loss1) < float(loss0) and losses[-1] < losses[0]
    method = WiseFTLinear(WiseFTConfig(select="fixed", alpha=0.3, epochs=2))
    method.fit(ctx)
    assert method.hyperparameters()["alpha"] == 0.3 and method.hyperparameters()["selection"]["split"] is None


@pytest.mark.usefixtures("one_thread")
def test_wise_ft_through_the_cli(run_cli, shapes_flags, tmp_path):
    out = tmp_path / "r.json"
    common = [*shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp", "--num_workers",
              "0", "--quiet", "--feature_cache", tmp_path / "cache", "--mitigation", "wise_ft"]
    rc, _, err = run_cli("eval", *common, "--output", out, "--plot")
    assert rc == 0, err
    results = json.loads(out.read_text())
    hp = results["robust"]["methods"]["wise_ft"]["hyperparameters"]
    assert len(hp["curve"]) == 11 and hp["selection"] == {"criterion": "worst_group", "split": "val"}
    assert hp["alpha"] == max(hp["curve"], key=lambda r: (r["val_worst_group_acc"], -r["alpha"]))["alpha"]
    assert (tmp_path / "r_wise_ft_curve.png").read_bytes()[:4] == b"\x89PNG"
    # alpha 0 alone is the zero-shot head: the same metrics as zero-shot
    rc, _, err = run_cli("eval", *common, "--output", tmp_path / "r0.json", "--wise_ft_alphas", "0")
    assert rc == 0, err
    m = json.loads((tmp_path / "r0.json").read_text())["metrics"]
    assert m["wise_ft/acc"] == m["zeroshot/acc"] and m["wise_ft/worst_group_acc"] == m["zeroshot/worst_group_acc"]
