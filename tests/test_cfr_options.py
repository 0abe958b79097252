"""CFR: the per-epoch curve and selection record, the plot writer, the authors' variants as
options, label-free selection, and torch-free registration (synthetic features from test_cfr)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from clip_robust_plugins.argtypes import add_config_flags, config_from_options
from clip_robust_plugins.mitigations import cfr as cfr_module
from clip_robust_plugins.mitigations.cfr import CFR, CFRConfig, training
from clip_robust_plugins.mitigations.cfr.losses import LogitScale, feature_dropout, make_logit_scale
from clip_robust_plugins.mitigations.cfr.sampling import authors_negatives
from test_cfr import fitted, make_ctx

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one torch thread is far faster




def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, CFRConfig, "cfr_")
    return parser.parse_args(list(argv))


def _create(options) -> CFR:
    """CFR as the engine makes it: ``create`` gets the config its declared options parse to."""
    return cfr_module._create(config_from_options(CFRConfig, "cfr_", options))


# ----------------------------------------------------------------------------- the curve and why an epoch was kept


def test_the_curve_records_every_epoch_and_the_selected_epoch_is_its_best():
    method = fitted(make_ctx(), epochs=5, erm_selection="last")
    hp = json.loads(json.dumps(method.hyperparameters()))
    curve = hp["curve"]
    assert [row["epoch"] for row in curve] == list(range(5))
    for row in curve:
        assert {"loss_ce", "loss_nce", "loss_supcon", "loss_weight", "val_worst_group_acc",
                "val_class_balanced_acc", "val_ce"} <= set(row)
        assert row["loss_ce"] > 0 and row["loss_nce"] > 0 and row["loss_supcon"] > 0
    scores = [row["val_worst_group_acc"] for row in curve]
    sel = hp["selection"]
    assert sel["criterion"] == "worst_group" and sel["split"] == "val" and sel["metric"] == "val_worst_group_acc"
    assert sel["epoch"] == scores.index(max(scores)) == hp["selected_epoch"] and sel["value"] == max(scores)
    assert "highest val worst-group accuracy" in sel["reason"] and "5 recalibration epochs" in sel["reason"]
    assert len(hp["erm_curve"]) == 6 and hp["erm_selected_epoch"] == 5  # --cfr_erm_selection last


def test_val_ce_selection_keeps_the_lowest_val_loss_and_reads_no_group_label():
    ctx = make_ctx()
    rng = np.random.default_rng(3)
    val = ctx.features("val", "preproj")
    fields = val.fields.clone()
    fields[:, 1] = torch.from_numpy(rng.integers(0, 2, len(val)))
    a = fitted(ctx, epochs=5, selection="val_ce")
    b = fitted(make_ctx(val=dataclasses.replace(val, fields=fields)), epochs=5, selection="val_ce")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    hp = a.hyperparameters()
    losses = [row["val_ce"] for row in hp["curve"]]
    assert hp["selected_epoch"] == losses.index(min(losses)) and hp["selection"]["value"] == min(losses)
    assert hp["labels_used"] == ["class"] and "val_worst_group_acc" not in hp["curve"][0]


def test_the_selected_state_is_the_head_of_the_selected_epoch():
    heads = {}
    ctx = make_ctx()
    method = CFR(CFRConfig(epochs=5, erm_epochs=6, lr=1e-2, batch_size=32))
    method.epoch_callback = lambda epoch, head: heads.__setitem__(epoch, head.proj.detach().clone())
    method.fit(ctx)
    assert sorted(heads) == list(range(5))
    assert torch.equal(method.state_dict()["head.proj"], heads[method.hyperparameters()["selected_epoch"]])


def test_plots_write_a_png_of_the_curve(tmp_path):
    assert CFR().plots() == {}  # nothing before a fit
    method = fitted(make_ctx(), epochs=3)
    writers = method.plots()
    assert set(writers) == {"curve"}
    path = tmp_path / "curve.png"
    writers["curve"](str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


# ----------------------------------------------------------------------------- the authors' variants


def test_flags_come_from_the_config_and_validate_their_values():
    options = _parse("--cfr_optimizer", "sgd", "--cfr_logit_scale", "learnable", "--cfr_negatives", "authors",
                     "--cfr_feature_dropout", "0.1", "--cfr_erm_selection", "best", "--cfr_selection", "val_ce")
    config = _create(options).config
    assert (config.optimizer, config.logit_scale, config.negatives) == ("sgd", "learnable", "authors")
    assert (config.feature_dropout, config.erm_selection, config.selection) == (0.1, "best", "val_ce")
    assert _parse().cfr_epochs is None and _create(_parse()).config == CFRConfig()  # dataclass defaults
    assert _parse("--cfr_logit_scale", "14.3").cfr_logit_scale == "14.3"
    assert _parse("--cfr_logit_scale", "model").cfr_logit_scale == "model"
    for bad in (["--cfr_logit_scale", "-1"], ["--cfr_logit_scale", "big"], ["--cfr_optimizer", "adam"],
                ["--cfr_feature_dropout", "1.5"]):
        with pytest.raises(SystemExit):
            _parse(*bad)
    with pytest.raises(ValueError, match="logit_scale"):
        CFRConfig(logit_scale="huge")


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = training.make_optimizer(params, CFRConfig(optimizer="sgd", lr=0.5))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.5
    assert isinstance(training.make_optimizer(params, CFRConfig()), torch.optim.AdamW)
    a, b = fitted(make_ctx(), optimizer="sgd"), fitted(make_ctx())
    assert not torch.equal(a.state_dict()["head.proj"], b.state_dict()["head.proj"])


def test_logit_scales():
    assert float(make_logit_scale("100", None)()) == pytest.approx(100.0)
    assert float(make_logit_scale("model", 12.5)()) == pytest.approx(12.5)
    learnable = make_logit_scale("learnable", None)
    assert float(learnable().detach()) == pytest.approx(1 / 0.07) and [p.requires_grad for p in learnable.parameters()] == [True]
    assert list(LogitScale(3.0, learnable=False).parameters()) == []
    with pytest.raises(ValueError, match="no logit_scale"):
        make_logit_scale("model", None)
    hp = fitted(make_ctx(), logit_scale="learnable", epochs=3).hyperparameters()
    assert all("logit_scale" in row for row in hp["curve"])
    assert hp["curve"][-1]["logit_scale"] != pytest.approx(1 / 0.07, abs=1e-4)  # it is trained
    ctx = make_ctx()
    ctx.model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    assert fitted(ctx, logit_scale="model", epochs=2).hyperparameters()["logit_scale_used"] == pytest.approx(20.0)


def test_authors_negatives_are_random_samples_of_the_anchor_class(monkeypatch):
    y = torch.tensor([0] * 30 + [1] * 30)
    gen = torch.Generator().manual_seed(0)
    anchor_y = torch.tensor([0, 1, 1])
    neg = authors_negatives(anchor_y, y, 16, gen)
    assert neg.shape == (3, 16)
    for row, c in zip(neg, anchor_y):
        assert (y[row] == c).all() and len(set(row.tolist())) == 16
    assert not torch.equal(neg, authors_negatives(anchor_y, y, 16, gen))  # redrawn every call

    seen = []
    real = training.info_nce
    monkeypatch.setattr(training, "info_nce", lambda a, p, n, tau: seen.append((a.detach(), n.detach())) or real(a, p, n, tau))
    ctx = make_ctx()
    method = fitted(ctx, epochs=1, negatives="authors")
    assert seen and method.hyperparameters()["negatives_desc"].startswith("authors'")
    train = ctx.features("train", "preproj")
    # the first InfoNCE call sees the model's own head: each embedding's nearest train row is the row itself
    head = cfr_module.init_head(ctx.model)
    emb = torch.nn.functional.normalize(head(train.features), dim=-1).detach()
    anchor_rows = (seen[0][0] @ emb.T).argmax(1)
    neg_rows = (seen[0][1] @ emb.T).argmax(-1)
    assert (train.y[neg_rows] == train.y[anchor_rows].unsqueeze(1)).all()


def test_feature_dropout_is_seeded_and_scaled():
    h = torch.ones(200, 50)
    a = feature_dropout(h, 0.1, torch.Generator().manual_seed(0))
    b = feature_dropout(h, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert 0.05 < (a == 0).float().mean() < 0.15 and torch.allclose(a[a != 0], torch.tensor(1 / 0.9))
    assert feature_dropout(h, 0.0, torch.Generator()) is h
    x, y = fitted(make_ctx(), feature_dropout=0.1), fitted(make_ctx(), feature_dropout=0.1)
    assert torch.equal(x.state_dict()["head.proj"], y.state_dict()["head.proj"])
    assert not torch.equal(x.state_dict()["head.proj"], fitted(make_ctx()).state_dict()["head.proj"])


def test_best_erm_selection_keeps_the_best_val_erm_epoch():
    hp = fitted(make_ctx(), erm_selection="best", epochs=2).hyperparameters()
    scores = [row["val_worst_group_acc"] for row in hp["erm_curve"]]
    assert hp["erm_selected_epoch"] == scores.index(max(scores))
    assert hp["erm_val_score"] == max(scores)


# ----------------------------------------------------------------------------- registration and the CLI


def test_registration_imports_no_torch():
    code = ("import sys; import clip_robust_plugins.mitigations.cfr as c; c.CFRConfig(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_authors_variant_writes_the_curve_and_its_png(run_cli, shapes_flags, tiny_pretrained, tmp_path):
    rc, _, err = run_cli(
        "eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", tiny_pretrained, "--num_workers", "0", "--no_amp",
        "--feature_cache", tmp_path / "cache", "--mitigation", "cfr", "--cfr_optimizer", "sgd",
        "--cfr_negatives", "authors", "--cfr_epochs", "3", "--cfr_erm_epochs", "2", "--cfr_batch_size", "64",
        "--plot", "--output", tmp_path / "run.json")
    assert rc == 0, err
    hp = json.loads((tmp_path / "run.json").read_text())["robust"]["methods"]["cfr"]["hyperparameters"]
    assert (hp["optimizer"], hp["negatives"]) == ("sgd", "authors")
    assert len(hp["curve"]) == 3 and hp["selection"]["epoch"] in range(3)
    assert (tmp_path / "run_cfr_curve.png").read_bytes()[:4] == b"\x89PNG"
