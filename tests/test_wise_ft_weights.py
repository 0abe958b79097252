"""WiSE-FT, weight-space form (wise_ft_weights): the interpolated tower against a direct computation,
the choice of alpha against a direct argmax, and the CLI (in-run clip_ft, a state file, the ends)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clip_robust_plugins.mitigations.wise_ft.selection import choose_alpha, curve_row, normalised_entropy
from clip_robust_plugins.mitigations.wise_ft.weights import interpolate_state
from clip_robust_plugins.states import StateError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_interpolated_state_is_the_direct_mix_and_its_ends_are_the_two_towers():
    g = torch.Generator().manual_seed(0)
    zero = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "ids": torch.arange(4)}
    tuned = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "ids": torch.arange(4)}
    for alpha in (0.0, 0.3, 1.0):
        got = interpolate_state(zero, tuned, alpha)
        for k in ("w", "b"):
            torch.testing.assert_close(got[k], zero[k] + alpha * (tuned[k] - zero[k]))
        assert torch.equal(got["ids"], tuned["ids"]) and got["ids"].dtype == torch.int64
    assert all(torch.equal(interpolate_state(zero, tuned, 0.0)[k], zero[k]) for k in zero)
    assert all(torch.equal(interpolate_state(zero, tuned, 1.0)[k], tuned[k]) for k in tuned)
    with pytest.raises(StateError, match="different parameters"):
        interpolate_state(zero, {"w": tuned["w"]}, 0.5)
    with pytest.raises(StateError, match="shape"):
        interpolate_state(zero, {**tuned, "b": torch.zeros(5)}, 0.5)


def test_interpolated_open_clip_tower_ends_equal_the_two_models():
    """On the shipped tiny model: alpha 0 is the zero-shot tower, alpha 1 the other checkpoint's."""
    from clip_robust_plugins.models import load_open_clip

    a = load_open_clip("crp-tiny", "spurious_shapes")[0].visual.state_dict()
    b = load_open_clip("crp-tiny", "spurious_quadrants")[0].visual.state_dict()
    for alpha, end in ((0.0, a), (1.0, b)):
        got = interpolate_state(a, b, alpha)
        assert all(torch.equal(got[k], end[k].float()) for k in end)
    mid = interpolate_state(a, b, 0.5)
    k = next(k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k]))
    torch.testing.assert_close(mid[k], (a[k].float() + b[k].float()) / 2)


def test_curve_choice_is_the_direct_argmax_with_ties_to_the_smaller_alpha():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    groups = 2 * y + rng.integers(0, 2, 40)
    logits = [torch.tensor(rng.normal(size=(40, 2)), dtype=torch.float32) for _ in range(11)]
    alphas = [round(0.1 * i, 1) for i in range(11)]
    curve = [curve_row(a, lg, "worst_group", lambda: y, lambda: groups) for a, lg in zip(alphas, logits)]
    wga = []
    for lg in logits:
        pred = lg.argmax(1).numpy()
        wga.append(min((pred[groups == g] == y[groups == g]).mean() for g in np.unique(groups)))
    assert [r["val_worst_group_acc"] for r in curve] == pytest.approx(wga)
    best = int(np.argmax(wga))  # np.argmax: the first (smallest alpha) of tied maxima
    assert choose_alpha(curve, "worst_group", 0.5) == (alphas[best], "val")
    tied = [{"alpha": a, "val_acc": v} for a, v in zip(alphas, [0.1, 0.7, 0.3, 0.7, 0.2, 0, 0, 0, 0, 0, 0])]
    assert choose_alpha(tied, "accuracy", 0.5) == (0.1, "val")
    # the label-free criterion reads no labels and takes the lowest mean normalised entropy
    boom = lambda: (_ for _ in ()).throw(AssertionError("labels read"))  # noqa: E731
    ent = [curve_row(a, lg * (1 + a), "entropy", boom, boom) for a, lg in zip(alphas, logits)]
    direct = [normalised_entropy(lg * (1 + a)) for a, lg in zip(alphas, logits)]
    assert choose_alpha(ent, "entropy", 0.5) == (alphas[int(np.argmin(direct))], "val")
    assert choose_alpha(ent, "fixed", 0.4) == (0.4, None)
    p = torch.softmax(logits[0], 1)
    assert normalised_entropy(logits[0]) == pytest.approx(float(-(p * p.log()).sum(1).mean() / np.log(2)), rel=1e-5)


def test_wise_ft_weights_through_the_cli(run_cli, quadrants_flags, tmp_path):
    common = [*quadrants_flags, "--feature_cache", tmp_path / "cache", "--ravl_lr", "1e-4", "--ravl_batch_size", "16",
              "--ravl_init", "spurious_shapes", "--quiet"]
    rc, _, err = run_cli("eval", *common, "--mitigation", "clip_ft", "wise_ft_weights", "--plot",
                         "--save_mitigation_state", "--output", tmp_path / "fit.json")
    assert rc == 0, err
    dump = json.loads((tmp_path / "fit.json").read_text())
    hp = dump["robust"]["methods"]["wise_ft_weights"]["hyperparameters"]
    curve = hp["curve"]
    assert [r["alpha"] for r in curve] == pytest.approx([0.1 * i for i in range(11)])
    assert hp["alpha"] == max(curve, key=lambda r: (r["val_worst_group_acc"], -r["alpha"]))["alpha"]
    assert hp["selection"] == {"criterion": "worst_group", "split": "val"}
    assert hp["start_checkpoint"] == "spurious_shapes" and hp["finetuned"]["fitted_in_run"] == "clip_ft"
    assert (tmp_path / "fit_wise_ft_weights_curve.png").read_bytes()[:4] == b"\x89PNG"
    for key in ("acc", "worst_group_acc", "region_acc", "region_worst_group_acc"):
        assert 0.0 <= dump["metrics"][f"wise_ft_weights/{key}"] <= 1.0
    # alpha 1 from clip_ft's saved state is clip_ft itself; the in-run fine-tuning was the same (same seed)
    state = tmp_path / "fit_state_clip_ft.safetensors"
    rc, _, err = run_cli("eval", *common, "--mitigation", "wise_ft_weights", "--wise_ft_finetuned", state,
                         "--wise_ft_alphas", "1", "--output", tmp_path / "one.json")
    assert rc == 0, err
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["metrics"]["wise_ft_weights/acc"] == dump["metrics"]["clip_ft/acc"]
    assert one["metrics"]["wise_ft_weights/worst_group_acc"] == dump["metrics"]["clip_ft/worst_group_acc"]
    assert one["robust"]["methods"]["wise_ft_weights"]["hyperparameters"]["curve"][0] == curve[-1]
    assert one["robust"]["methods"]["wise_ft_weights"]["labels_used"]["splits"] == {"val": "group"}
    # alpha 0 is the start model: evaluated as --pretrained spurious_shapes it is that run's zero-shot
    start_flags = [a if a != "spurious_quadrants" else "spurious_shapes" for a in common]
    rc, _, err = run_cli("eval", *start_flags, "--mitigation", "wise_ft_weights", "--wise_ft_finetuned", state,
                         "--wise_ft_alphas", "0", "--output", tmp_path / "zero.json")
    assert rc == 0, err
    m = json.loads((tmp_path / "zero.json").read_text())["metrics"]
    assert m["wise_ft_weights/acc"] == m["zeroshot/acc"] and m["wise_ft_weights/worst_group_acc"] == m["zeroshot/worst_group_acc"]
    # its own state reloads to the same predictions
    rc, _, err = run_cli("eval", *common, "--mitigation", "wise_ft_weights", "--mitigation_state",
                         tmp_path / "fit_state_wise_ft_weights.safetensors", "--output", tmp_path / "re.json")
    assert rc == 0, err
    re = json.loads((tmp_path / "re.json").read_text())["metrics"]
    assert re["wise_ft_weights/acc"] == dump["metrics"]["wise_ft_weights/acc"]
    # a wrong --wise_ft_finetuned is one line before any work
    rc, _, err = run_cli("eval", *common, "--mitigation", "wise_ft_weights", "--wise_ft_finetuned", tmp_path / "nope",
                         "--output", tmp_path / "bad.json")
    assert rc == 2 and "--wise_ft_finetuned" in err and len(err.strip().splitlines()) == 1
