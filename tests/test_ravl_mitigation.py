"""RaVL's mitigation in the paper's protocol (--ravl_init), region-level metrics, the loss options,
the oracle diagnostic, feature_plan and check."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_robust_plugins.argtypes import spec_config
from clip_robust_plugins.datasets.spurious_quadrants import QuadrantsConfig, iter_split
from clip_robust_plugins.mitigations.ravl.losses import label_to_region_loss, relevant_regions
from clip_robust_plugins.mitigations.ravl.region_metrics import object_box, region_metrics
from conftest import QSMALL

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one torch thread is far faster



def _context(flags, *extra):
    """The run context ``eval`` builds (evaluated split: test), its registry and the parsed flags."""
    from clip_robust_plugins import cli, engine, plugins

    pm = plugins.build_plugin_manager()
    registry = plugins.collect_registry(pm)
    parsed = cli.build_parser(pm, registry, "eval").parse_args(["eval", *flags, "--no_feature_cache", "--quiet", *extra])
    (args,) = cli.own_runs(parsed)  # one run: the flags' lists become values, as eval runs it
    args.device = "cpu"
    return engine.build_context(args, registry, engine.load_dataset(args, registry), "test"), registry, args


def _create(registry, name: str, args):
    """A method as the engine makes it: ``create`` gets the typed config its declared flags parse to."""
    spec = registry.mitigation(name)
    return spec.create(spec_config(spec, args))


# ----------------------------------------------------------------------------- the loss options


def test_relevant_positive_is_the_best_scoring_usable_region():
    label_emb = torch.eye(2, 4)
    regions = F.normalize(torch.tensor([[[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1.0, 0, 0]],
                                        [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0.8, 0.2, 0]]]), dim=-1)
    labels = torch.tensor([0, 1])
    usable = torch.tensor([[False, True, True], [True, True, True]])
    got = relevant_regions(regions, usable, labels, label_emb)
    # image 0 (label 0): region 0 is not usable, region 1 is the best usable one; image 1 (label 1): region 1
    assert got.tolist() == [[False, True, False], [False, True, False]]
    assert not relevant_regions(regions, usable, torch.tensor([0, -1]), label_emb)[1].any()


def test_other_class_negatives_push_the_other_labels_regions_away():
    label_emb = torch.eye(2, 4)
    labels = torch.tensor([0, 1])
    # one positive region per image, no spurious region at all
    regions = F.normalize(torch.tensor([[[1.0, 0.5, 0, 0]], [[0.5, 1.0, 0, 0]]]), dim=-1).requires_grad_(True)
    valid = torch.ones(2, 1, dtype=torch.bool)
    spurious = torch.zeros(2, 1, dtype=torch.bool)
    assert label_to_region_loss(regions, valid, spurious, labels, label_emb, 0.07) == 0.0  # nothing to push
    loss = label_to_region_loss(regions, valid, spurious, labels, label_emb, 0.07, other_class_negatives=True)
    assert loss > 0
    loss.backward()
    # descent (-grad) moves image 1's region away from label 0 and image 0's away from label 1
    assert -regions.grad[1, 0, 0] < 0 and -regions.grad[0, 0, 1] < 0


# ----------------------------------------------------------------------------- region metrics


def test_object_box_from_the_json():
    assert object_box({"regions": [[0, 0, 2, 2], [2, 0, 4, 2]], "object_quadrant": 1}) == (2, 0, 4, 2)
    assert object_box({"object_region": [1, 1, 3, 3]}) == (1, 1, 3, 3)
    assert object_box({"box": [0, 0, 1, 1]}) is None and object_box({}) is None


def test_region_metrics_need_region_labels_and_touch_no_model(tmp_path):
    from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig
    from clip_robust_plugins.datasets.spurious_shapes import generate as gen_shapes
    from clip_robust_plugins.datasets.wds import GroupedShards

    gen_shapes(tmp_path / "shapes", ShapesConfig(train_size=8, val_size=8, test_size=8), progress=False)

    class Ctx:
        dataset = GroupedShards(tmp_path / "shapes")

        @property
        def model(self):
            raise AssertionError("the model was touched")

    class Method:
        def as_open_clip(self, ctx):
            raise AssertionError("the encoder was asked for")

    preds = argparse.Namespace(split="test", method="clip_ft")
    assert region_metrics(preds, ctx=Ctx(), mitigation=Method()) == {}


# ----------------------------------------------------------------------------- the paper's protocol, end to end


def test_ravl_init_starts_both_fine_tunings_and_region_metrics_are_reported(run_cli, quadrants_flags, tmp_path):
    from clip_robust_plugins.models import load_open_clip
    from clip_robust_plugins.states import read_state

    common = [*quadrants_flags, "--feature_cache", tmp_path / "cache", "--ravl_lr", "1e-4", "--ravl_batch_size", "16",
              "--ravl_init", "spurious_shapes"]
    rc, _, err = run_cli("eval", *common, "--mitigation", "ravl", "clip_ft", "--ravl_positive_regions", "relevant",
                         "--ravl_negatives", "spurious+other_classes", "--ravl_region_features", "masked",
                         "--save_mitigation_state", "--save_predictions", "--output", tmp_path / "fit.json")
    assert rc == 0, err
    dump = json.loads((tmp_path / "fit.json").read_text())
    methods = dump["robust"]["methods"]
    for name in ("ravl", "clip_ft"):
        hp = methods[name]["hyperparameters"]
        assert hp["init"] == "spurious_shapes" and hp["start_checkpoint"] == "spurious_shapes"
    hp = methods["ravl"]["hyperparameters"]
    assert hp["positive_regions"] == "relevant" and hp["negatives"] == "spurious+other_classes"
    assert hp["region_features_used"] == "masked" and hp["losses_per_epoch"][0]["label_to_region"] > 0
    assert hp["discovery"]["split"] == "val"  # discovery ran on the evaluated (biased) model
    # image and region metrics for every method
    for name in ("zeroshot", "ravl", "clip_ft"):
        for key in ("acc", "worst_group_acc", "region_acc", "region_worst_group_acc"):
            assert 0.0 <= dump["metrics"][f"{name}/{key}"] <= 1.0
    # the fine-tuning started from spurious_shapes: its text tower is saved, its image tower moved a little
    start = load_open_clip("crp-tiny", "spurious_shapes")[0]
    biased = load_open_clip("crp-tiny", "spurious_quadrants")[0]
    state = read_state(str(tmp_path / "fit_state_clip_ft.safetensors")).tensors
    assert any(k.startswith("base.text") or k.startswith("base.transformer") for k in state)
    for k, v in start.state_dict().items():
        if not k.startswith("visual."):
            torch.testing.assert_close(state[f"base.{k}"].float(), v.float())
    dist = {name: sum(float((state[f"visual.{k}"].float() - v.float()).norm())
                      for k, v in m.visual.state_dict().items()) for name, m in (("start", start), ("biased", biased))}
    assert dist["start"] < dist["biased"]
    # reloaded states give the same predictions (the start's text tower comes back with them)
    rc, _, err = run_cli("eval", *common, "--mitigation", "ravl", "clip_ft", "--mitigation_state",
                         tmp_path / "fit_state_ravl.safetensors", tmp_path / "fit_state_clip_ft.safetensors",
                         "--save_predictions", "--output", tmp_path / "re.json")
    assert rc == 0, err
    assert (tmp_path / "fit_predictions.csv").read_text() == (tmp_path / "re_predictions.csv").read_text()
    rows = list(csv.DictReader(open(tmp_path / "fit_predictions.csv")))
    assert len(rows) == QSMALL["test_size"]


def test_zeroshot_region_accuracy_by_hand(run_cli, quadrants_flags, tmp_path, quadrants_root):
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    from clip_robust_plugins.datasets.spurious_shapes import TEMPLATES
    from clip_robust_plugins.models import load_open_clip

    rc, _, err = run_cli("eval", *quadrants_flags, "--no_feature_cache", "--output", tmp_path / "zs.json")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "zs.json").read_text())["metrics"]
    model, transform, tokenizer = load_open_clip("crp-tiny", "spurious_quadrants")
    model.eval()
    head = zero_shot_classifier(model, tokenizer, ["square", "diamond"], list(TEMPLATES), "cpu", amp=False)
    correct, group_hits = [], {}
    for _key, image, values, extra, _mask in iter_split(QuadrantsConfig(**QSMALL), "test"):
        crop = image.crop(tuple(extra["regions"][extra["object_quadrant"]]))
        with torch.no_grad():
            emb = F.normalize(model.encode_image(transform(crop)[None]), dim=-1)
        ok = int((emb @ head).argmax()) == values["y"]
        correct.append(ok)
        group_hits.setdefault(values["y"] * 2 + values["a"], []).append(ok)
    assert metrics["zeroshot/region_acc"] == pytest.approx(np.mean(correct))
    assert metrics["zeroshot/region_worst_group_acc"] == pytest.approx(min(np.mean(v) for v in group_hits.values()))


# ----------------------------------------------------------------------------- oracle, feature_plan, check


def test_oracle_spurious_regions_are_the_labelled_patches(quadrants_flags):

    ctx, registry, args = _context(quadrants_flags, "--ravl_spurious_regions", "oracle", "--ravl_batch_size", "32")
    method = _create(registry, "ravl", args)
    assert method.feature_plan(ctx, True) == {}  # no discovery: no region features
    method.fit(ctx)
    hp = method.hyperparameters()
    counts = QuadrantsConfig(**QSMALL).group_counts("train")
    assert hp["spurious_train_regions"] == counts[1] + counts[3]  # one patch quadrant per patch image
    assert "discovery" not in hp and "regions (oracle)" in hp["labels_used"]
    truth = {key: extra["spurious_quadrant"] for key, _i, _v, extra, _m in iter_split(QuadrantsConfig(**QSMALL), "train")}
    for key, mask in method.train_spurious.items():
        assert mask.tolist() == [q == truth[key] for q in range(4)]


def test_feature_plan_and_check(quadrants_flags, tmp_path):
    from clip_robust_plugins.plugins import PluginError
    from clip_robust_plugins.states import StateError

    ctx, registry, args = _context(quadrants_flags)
    method = _create(registry, "ravl", args)
    plan = method.feature_plan(ctx, True)
    assert [k if isinstance(k, str) else k.name for k in plan["val"]] == ["image", "regions[grid2]"]
    assert [k.name for k in plan["train"]] == ["regions[grid2]"] and method.feature_plan(ctx, False) == {}
    assert _create(registry, "clip_ft", args).feature_plan(ctx, True) == {}
    method.check(ctx)
    assert not ctx.model_loaded
    for extra, error, message in (
        (["--ravl_regions", "nope"], PluginError, "nope"),
        (["--ravl_discovery_split", "holdout"], ValueError, "holdout"),
        (["--ravl_init", str(tmp_path / "missing.safetensors")], ValueError, "no such file"),
    ):
        bad_args = argparse.Namespace(**{**vars(args), **{k[2:]: v for k, v in zip(extra[::2], extra[1::2])}})
        with pytest.raises(error, match=message):
            _create(registry, "ravl", bad_args).check(ctx)
    ctx.model_type, ctx.pretrained = "ravl", str(tmp_path / "missing.safetensors")
    with pytest.raises(StateError, match="not found"):
        method.check(ctx)


def test_masked_region_views_keep_the_region_in_place_at_the_images_scale():
    from PIL import Image

    from clip_robust_plugins.datasets.base import SampleImage
    from clip_robust_plugins.mitigations.ravl.proposers import GridProposer
    from clip_robust_plugins.mitigations.ravl.views import TrainViews
    from clip_robust_plugins.models import load_open_clip

    _, transform, _ = load_open_clip("crp-tiny", "spurious_quadrants")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = TrainViews(transform, GridProposer(2), "masked")(SampleImage("k", image, {}))
    x = out["views"]  # the image, then one masked copy per quadrant, all at the input size (32 px)
    assert x.shape == (5, 3, 32, 32) and out["valid"].all()
    torch.testing.assert_close(x[1, :, :16, :16], x[0, :, :16, :16])  # top-left quadrant: the image's own pixels
    assert (x[1, :, 16:, :] == 0).all() and (x[1, :, :, 16:] == 0).all()  # the rest: the normalisation mean
    torch.testing.assert_close(x[4, :, 16:, 16:], x[0, :, 16:, 16:])
