"""clip_ft's robust fine-tuning baselines: JTT-style upsampling (--ravl_sampling upsample) and
clip_ft_group_dro, against direct computations and end to end in RaVL's protocol (--ravl_init)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_robust_plugins.mitigations.ravl.group_dro_loss import GroupDRO, clip_loss_per_sample
from clip_robust_plugins.mitigations.ravl.losses import clip_loss
from clip_robust_plugins.mitigations.ravl.sampling import epoch_counts, repeated, upsample_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_upsample_weights_match_a_direct_computation():
    wrong = np.array([True, False, False, True, False, False, False])
    p, factor = upsample_weights(wrong, 0.0)  # auto: n_correct / n_wrong = 5 / 2
    direct = np.where(wrong, 2.5, 1.0)
    np.testing.assert_allclose(p, direct / direct.sum())
    assert factor == 2.5 and p[wrong].sum() == pytest.approx(p[~wrong].sum())  # the two sets weigh the same
    p, factor = upsample_weights(wrong, 10.0)
    np.testing.assert_allclose(p, np.where(wrong, 10.0, 1.0) / 25.0)
    p, factor = upsample_weights(np.zeros(4, bool), 0.0)  # nothing misclassified: uniform
    np.testing.assert_allclose(p, np.full(4, 0.25))
    assert factor == 1.0


def test_epoch_counts_are_a_seeded_weighted_draw_and_the_stream_repeats_by_them():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    counts = epoch_counts(p, np.random.default_rng(3))
    assert counts.sum() == 4
    np.testing.assert_array_equal(counts, np.random.default_rng(3).multinomial(4, p))
    many = sum(epoch_counts(p, np.random.default_rng(s)) for s in range(2000)) / 2000
    np.testing.assert_allclose(many, 4 * p, atol=0.05)  # the expected draws: N p
    items = [("a", 1), ("b", 2), ("c", 3)]
    assert [k for k, _ in repeated(items, {"a": 2, "b": 0, "c": 1})] == ["a", "a", "c"]


def test_per_pair_clip_loss_averages_to_the_clip_loss():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 0, 1, -1, 1])
    per = clip_loss_per_sample(image, text, labels, 0.07)
    assert per.shape == (6,)
    torch.testing.assert_close(per.mean(), clip_loss(image, text, labels, 0.07))


def test_group_dro_update_matches_a_hand_run_update():
    per = torch.tensor([1.0, 3.0, 2.0, 0.5, 4.0], requires_grad=True)
    groups = torch.tensor([0, 0, 2, 2, 2])  # group 1 absent from the batch, group 3 too
    dro = GroupDRO(4, eta=0.1)
    loss = dro.loss(per, groups)
    # by hand: group means, q <- q exp(eta L) normalised (absent groups: L = 0), loss = sum q L
    means = np.array([2.0, 0.0, 6.5 / 3, 0.0])
    q = 0.25 * np.exp(0.1 * means)
    q /= q.sum()
    np.testing.assert_allclose(dro.q.numpy(), q, rtol=1e-6)
    assert float(loss.detach()) == pytest.approx(float((q * means).sum()), rel=1e-6)
    loss.backward()  # d loss / d per_i = q_g(i) / n_g(i): the weights are constants of the step
    np.testing.assert_allclose(per.grad.numpy(), [q[0] / 2, q[0] / 2, q[2] / 3, q[2] / 3, q[2] / 3], rtol=1e-6)
    # a second step starts from the first's weights
    dro.loss(torch.tensor([1.0, 1.0]), torch.tensor([1, 1]))
    q2 = q * np.exp(0.1 * np.array([0.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(dro.q.numpy(), q2 / q2.sum(), rtol=1e-6)


def test_both_baselines_in_ravl_protocol_end_to_end(run_cli, quadrants_flags, tmp_path):
    common = [*quadrants_flags, "--feature_cache", tmp_path / "cache", "--ravl_lr", "1e-4", "--ravl_batch_size", "16",
              "--ravl_init", "spurious_shapes", "--quiet"]
    rc, _, err = run_cli("eval", *common, "--mitigation", "clip_ft", "clip_ft_group_dro", "--ravl_sampling", "upsample",
                         "--ravl_dro_eta", "0.05", "--output", tmp_path / "fit.json")
    assert rc == 0, err
    dump = json.loads((tmp_path / "fit.json").read_text())
    methods = dump["robust"]["methods"]
    ft, dro = methods["clip_ft"], methods["clip_ft_group_dro"]
    # labels: clip_ft reads train classes only (the upsampling too); the oracle reads train groups
    assert ft["labels_used"] == {"labels": "class", "splits": {"train": "class"}}
    assert dro["labels_used"] == {"labels": "group", "splits": {"train": "group"}}
    assert ft["settings"]["sampling"] == "upsample" and dro["settings"]["dro_eta"] == 0.05
    assert ft["hyperparameters"]["objective"] == "erm" and dro["hyperparameters"]["objective"] == "group_dro"
    assert ft["hyperparameters"]["start_checkpoint"] == "spurious_shapes"
    q = dro["hyperparameters"]["group_weights_final"]
    assert len(q) == 4 and sum(q.values()) == pytest.approx(1.0, abs=1e-4)
    for name in ("clip_ft", "clip_ft_group_dro"):
        for key in ("acc", "worst_group_acc", "region_acc", "region_worst_group_acc"):
            assert 0.0 <= dump["metrics"][f"{name}/{key}"] <= 1.0
    # upsampling the start's errors instead (spurious_shapes, the --ravl_init model) gives another fit
    rc, _, err = run_cli("eval", *common, "--mitigation", "clip_ft", "--ravl_sampling", "upsample",
                         "--ravl_upsample_errors_of", "start", "--output", tmp_path / "start_errors.json")
    assert rc == 0, err
    start_hp = json.loads((tmp_path / "start_errors.json").read_text())["robust"]["methods"]["clip_ft"]["hyperparameters"]
    assert start_hp["losses_per_epoch"] != ft["hyperparameters"]["losses_per_epoch"]
    # each upsampled set is its model's zero-shot errors on train, counted directly from its predictions
    for sampling, checkpoint in ((ft["hyperparameters"]["sampling_used"], "spurious_quadrants"),
                                 (start_hp["sampling_used"], "spurious_shapes")):
        flags = [a if a != "spurious_quadrants" else checkpoint for a in quadrants_flags]
        rc, _, err = run_cli("eval", *flags, "--feature_cache", tmp_path / "cache", "--split", "train",
                             "--save_predictions", "--quiet", "--output", tmp_path / f"{checkpoint}.json")
        assert rc == 0, err
        rows = list(csv.DictReader(open(tmp_path / f"{checkpoint}_predictions.csv")))
        wrong = sum(r["y"] != r["pred_zeroshot"] for r in rows)
        assert checkpoint in sampling["rule"] and sampling["train_images"] == len(rows)
        assert sampling["misclassified"] == wrong
        assert sampling["factor_used"] == pytest.approx((len(rows) - wrong) / wrong, abs=1e-4)


@pytest.mark.slow
def test_upsampling_and_group_dro_under_torchrun_equal_one_process(quadrants_root, tmp_path):
    """Every rank draws the same weighted epoch (rank 0 sends the weights) and updates the same GroupDRO
    weights from the gathered global batch: 2 ranks give one process's predictions and group weights."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import QSMALL

    script = shutil.which("clip_benchmark_robust")
    assert script, "the clip_benchmark_robust console script is not installed"
    flags = ["eval", "--dataset", "robust/spurious_quadrants", "--dataset_root", str(quadrants_root),
             *[x for k, v in QSMALL.items() for x in (f"--quadrants_{k}", str(v))],
             "--model", "crp-tiny", "--pretrained", "spurious_quadrants", "--no_amp", "--num_workers", "0", "--quiet",
             "--mitigation", "clip_ft_group_dro", "--ravl_sampling", "upsample", "--ravl_lr", "1e-4",
             "--ravl_batch_size", "16", "--save_predictions"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]
    for name, launcher in (("single", []), ("torchrun", torchrun)):
        cmd = [*launcher, script, *flags, "--output", str(tmp_path / f"{name}.json"),
               "--feature_cache", str(tmp_path / f"features_{name}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    hp = {n: json.loads((tmp_path / f"{n}.json").read_text())["robust"]["methods"]["clip_ft_group_dro"]["hyperparameters"]
          for n in ("single", "torchrun")}
    assert hp["torchrun"]["processes"] == 2 and hp["single"]["processes"] == 1
    assert hp["torchrun"]["sampling_used"] == hp["single"]["sampling_used"]
    q1, q2 = hp["single"]["group_weights_final"], hp["torchrun"]["group_weights_final"]
    assert q1.keys() == q2.keys() and all(abs(q1[k] - q2[k]) < 1e-4 for k in q1)
    assert (tmp_path / "torchrun_predictions.csv").read_text() == (tmp_path / "single_predictions.csv").read_text()
