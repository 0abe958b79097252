"""CFR: pre-projection features, the protocol pieces, the fitted head and the plugin wiring.

Most tests run on synthetic pre-projection features through a tiny stand-in for the
engine's RunContext (it reuses RunContext's seeding and zero-shot scoring), with a
"ViT" whose only part is ``visual.proj``; one test runs the whole CLI.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_robust_plugins import AdaptedCLIP, RunContext, models
from clip_robust_plugins.argtypes import spec_config
from clip_robust_plugins.features import (
    FEATURE_KINDS,
    FeatureSet,
    attnpool_input_shape,
    encode_image_normalized,
    preproj_features,
    projection_head_type,
)
from clip_robust_plugins.groups import two_field_schema
from clip_robust_plugins.mitigations.cfr import (
    CFR,
    CFRConfig,
    apply_head,
    calibration_split,
    cosine_weight,
    hard_negatives,
    init_head,
    load_cfr_model,
    sample_positives,
)
from clip_robust_plugins.mitigations.cfr import training as cfr_training
from clip_robust_plugins.plugins import add_spec_flags
from clip_robust_plugins.states import StateError, read_state, write_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one torch thread is far faster

SCHEMA = two_field_schema(["c0", "c1"], ["a0", "a1"])
PLUGIN = "clip_robust_plugins.mitigations.cfr"




# ----------------------------------------------------------------------------- synthetic stand-ins


class FakeVisual(torch.nn.Module):
    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Parameter(proj)


class FakeModel(torch.nn.Module):
    """Just enough of an open_clip ViT for CFR's head: ``visual.proj``."""

    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.visual = FakeVisual(proj)


class FakeContext:
    """The part of RunContext that CFR uses, over in-memory ``preproj`` FeatureSets."""

    torch_generator = RunContext.torch_generator  # the real seed + salt derivation
    zeroshot_logits = RunContext.zeroshot_logits  # the real scoring

    def __init__(self, splits: dict[str, FeatureSet], model, text: torch.Tensor, seed: int = 0):
        self._splits = splits
        self.model = model
        self._text = text
        self.seed = seed
        self.schema = SCHEMA
        self.classnames = list(SCHEMA.classnames)
        self.model_type = "open_clip"
        self.device, self.amp, self.progress, self.eval_split = "cpu", False, False, "test"
        self.reads: list[tuple[str, str]] = []

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def features(self, split: str, kind: str = "image") -> FeatureSet:
        self.reads.append((split, kind))
        return self._splits[split]

    def zeroshot_head(self) -> torch.Tensor:
        return self._text.to(self.device)


def make_split(seed: int, counts, dim: int = 12, prefix: str = "s") -> FeatureSet:
    """Pre-projection features: dim 0 carries the class (weakly), dim 1 the attribute (strongly)."""
    rng = np.random.default_rng(seed)
    xs, fields = [], []
    for group, n in enumerate(counts):
        y, a = divmod(group, 2)
        x = rng.normal(0.0, 1.0, (n, dim))
        x[:, 0] += 2 * y - 1
        x[:, 1] += 3.0 * (2 * a - 1)
        xs.append(x)
        fields += [[y, a]] * n
    keys = tuple(f"{prefix}{i}" for i in range(sum(counts)))
    return FeatureSet(keys, torch.tensor(np.concatenate(xs), dtype=torch.float32), torch.tensor(fields), SCHEMA, "preproj")


def make_ctx(seed: int = 0, train=None, val=None, dim: int = 12, embed: int = 6) -> FakeContext:
    gen = torch.Generator().manual_seed(7)
    proj = torch.randn(dim, embed, generator=gen) * 0.3
    text = torch.stack([-proj[0] - 0.5 * proj[1], proj[0] + 0.5 * proj[1]], 1)  # leaks the attribute
    text = text / text.norm(dim=0, keepdim=True)
    splits = {
        "train": train or make_split(1, (95, 5, 5, 95), dim, "t"),
        "val": val or make_split(2, (12, 12, 12, 12), dim, "v"),
        "test": make_split(3, (20, 20, 20, 20), dim, "e"),
    }
    return FakeContext(splits, FakeModel(proj), text, seed)


SMALL = dict(epochs=4, erm_epochs=6, lr=1e-2, batch_size=32)


def fitted(ctx, **overrides) -> CFR:
    method = CFR(CFRConfig(**{**SMALL, **overrides}))
    method.fit(ctx)
    return method


def tiny_vit():
    open_clip.add_model_config(models.ASSETS / "crp-tiny.json")
    torch.manual_seed(0)  # test code: the global RNG is ours here
    return open_clip.create_model("crp-tiny").eval()


def tiny_resnet():
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"layers": [1, 1, 1, 1], "width": 16, "image_size": 64, "head_width": 8},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()


# ----------------------------------------------------------------------------- A. preproj features


def test_preproj_times_proj_is_encode_image_for_a_vit():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pre = preproj_features(model, images)
        expected = model.encode_image(images)
        assert projection_head_type(model) == "vit_proj"
        assert pre.shape == (3, model.visual.proj.shape[0])
        torch.testing.assert_close(pre @ model.visual.proj, expected, rtol=1e-5, atol=1e-6)
        assert model.visual.proj is not None  # restored after the call
        # "image" is unchanged: clip_benchmark's normalised embedding
        assert FEATURE_KINDS["image"] is encode_image_normalized
        assert FEATURE_KINDS["preproj"] is preproj_features


def test_preproj_of_a_modified_resnet_is_the_attnpool_input():
    model = tiny_resnet()
    assert type(model.visual).__name__ == "ModifiedResNet" and projection_head_type(model) == "attnpool"
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre = preproj_features(model, images)
        shape = attnpool_input_shape(model.visual.attnpool)
        assert shape == (16 * 32, 2, 2) and pre.shape == (2, math.prod(shape))
        torch.testing.assert_close(model.visual.attnpool(pre.view(-1, *shape)), model.encode_image(images))
    assert not model.visual.attnpool._forward_pre_hooks  # the capture hook is gone


def test_preproj_of_any_other_tower_is_the_embedding():
    model = AdaptedCLIP(tiny_vit(), torch.nn.Identity())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert projection_head_type(model) == "adapter"
        torch.testing.assert_close(preproj_features(model, images), model.encode_image(images))


# ----------------------------------------------------------------------------- protocol pieces


def test_cosine_schedule_values():
    assert cosine_weight(0, 8) == pytest.approx(1.5)
    assert cosine_weight(2, 8) == pytest.approx(1.0)
    assert cosine_weight(4, 8) == pytest.approx(0.5)
    assert cosine_weight(6, 8) == pytest.approx(1.0)
    assert cosine_weight(7, 8) == pytest.approx(1 + 0.5 * math.cos(2 * math.pi * 7 / 8))


def test_calibration_set_is_exactly_the_erm_misclassified_train_samples():
    ctx = make_ctx()
    method = fitted(ctx)
    train = ctx.features("train", "preproj")
    erm = init_head(ctx.model)
    erm.load_state_dict(method.erm_state)
    with torch.no_grad():
        pred = (100 * F.normalize(erm(train.features), dim=-1) @ ctx.zeroshot_head()).argmax(1)
    wrong = (pred != train.y).nonzero().flatten()
    assert len(wrong) > 0
    assert torch.equal(method.calibration_indices, wrong)
    hp = method.hyperparameters()
    assert hp["calibration_set_size"] == len(wrong)
    assert hp["calibration_set_per_class"] == torch.bincount(train.y[wrong], minlength=2).tolist()
    assert hp["erm_train_acc"] == pytest.approx(1 - len(wrong) / len(train))


def test_positives_are_correctly_classified_and_of_the_anchor_class():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 1, 0])
    pred = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0, 1, 1])
    cal, correct = calibration_split(pred, y)
    assert cal.tolist() == [1, 4, 9] and correct.tolist() == [0, 2, 3, 5, 6, 7, 8]
    gen = torch.Generator().manual_seed(0)
    pos, valid = sample_positives(y[cal], correct, y, k=3, generator=gen)
    assert valid.all() and pos.shape == (3, 3)
    for row, anchor in zip(pos, cal):
        assert set(row.tolist()) <= set(correct.tolist())
        assert (y[row] == y[anchor]).all()
        assert len(set(row.tolist())) == 3  # without replacement when the class has enough
    # fewer than k correct samples of the class: drawn with replacement; none: no positives
    pos, valid = sample_positives(torch.tensor([0, 1]), torch.tensor([0, 3]), y, k=4, generator=gen)
    assert valid.all() and set(pos[0].tolist()) == {0} and set(pos[1].tolist()) == {3}
    pos, valid = sample_positives(torch.tensor([0, 1]), torch.tensor([3]), y, k=4, generator=gen)
    assert valid.tolist() == [False, True]


def test_hard_negatives_are_the_most_similar_samples_of_other_classes():
    gen = torch.Generator().manual_seed(0)
    space = torch.randn(40, 5, generator=gen)
    y = torch.arange(40) % 3
    anchors = torch.tensor([0, 4, 11, 30])
    neg = hard_negatives(space, y, anchors, k=6)
    assert neg.shape == (4, 6)
    unit = F.normalize(space, dim=-1)
    for row, a in zip(neg, anchors):
        assert (y[row] != y[a]).all()
        others = (y != y[a]).nonzero().flatten()
        sims = unit[others] @ unit[a]
        expected = others[sims.argsort(descending=True)[:6]]
        assert row.tolist() == expected.tolist()
    # k shrinks to the smallest number of other-class samples
    assert hard_negatives(space[:4], torch.tensor([0, 0, 0, 1]), torch.tensor([0]), k=16).shape == (1, 1)


def test_the_fit_uses_hard_negatives_from_other_classes(monkeypatch):
    """The fit hands the InfoNCE term the precomputed other-class hard negatives (not same-class ones)."""
    seen = []
    real = cfr_training.info_nce

    def spy(anchor, positives, negatives, tau):
        seen.append((anchor.detach(), positives.detach(), negatives.detach()))
        return real(anchor, positives, negatives, tau)

    monkeypatch.setattr(cfr_training, "info_nce", spy)
    ctx = make_ctx()
    method = fitted(ctx, epochs=1)
    assert seen and seen[0][1].shape[1] == 16 and seen[0][2].shape[1] == 16
    train = ctx.features("train", "preproj")
    cal = method.calibration_indices
    neg = hard_negatives(train.features, train.y, cal, 16)
    assert all((train.y[row] != train.y[a]).all() for row, a in zip(neg, cal))
    # the negatives InfoNCE saw at the first step are embeddings of exactly those rows
    head = init_head(ctx.model)  # the step-0 head is the model's own
    anchor0 = seen[0][0][0]
    emb = F.normalize(head(train.features), dim=-1).detach()
    a_row = int((emb @ anchor0).argmax())
    assert a_row in cal.tolist()
    expected = emb[neg[cal.tolist().index(a_row)]]
    torch.testing.assert_close(seen[0][2][0], expected)


# ----------------------------------------------------------------------------- the fitted method


def test_fit_is_deterministic_under_a_seed_and_changes_with_it():
    a, b = fitted(make_ctx(seed=0)), fitted(make_ctx(seed=0))
    c = fitted(make_ctx(seed=1))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.hyperparameters() == b.hyperparameters() | {"seconds": a.hyperparameters()["seconds"]}
    assert not torch.equal(a.state_dict()["head.proj"], c.state_dict()["head.proj"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_and_predict_on_cuda_agree_with_the_cpu():
    cpu = make_ctx()
    gpu = make_ctx()
    gpu.device = "cuda"
    a, b = fitted(cpu), fitted(gpu)
    # float arithmetic differs between devices, so compare loosely
    assert abs(len(a.calibration_indices) - len(b.calibration_indices)) <= 5
    logits = b.predict(gpu, "test")
    assert logits.device.type == "cpu" and logits.shape == (80, 2)
    assert (logits.argmax(1) == a.predict(cpu, "test").argmax(1)).float().mean() > 0.8
    json.dumps(b.hyperparameters())


def test_state_roundtrip_gives_identical_logits_and_json_hyperparameters(tmp_path):
    ctx = make_ctx()
    method = fitted(ctx)
    state = method.state_dict()
    assert set(state) == {"head.proj", "head_type"} and int(state["head_type"][0]) == 0
    path = str(tmp_path / "cfr.safetensors")
    hp = method.hyperparameters()
    write_state(path, "cfr", state, {"model": "m", "pretrained": "p", "hyperparameters": hp})
    loaded = CFR()
    loaded.load_state_dict(read_state(path).tensors)
    assert torch.equal(loaded.predict(ctx, "test"), method.predict(ctx, "test"))
    text = json.dumps(hp)
    back = json.loads(text)
    assert back["selected_epoch"] in range(SMALL["epochs"]) and len(back["val_scores"]) == SMALL["epochs"]
    assert back["selected_val_score"] == max(back["val_scores"])
    assert back["selected_epoch"] == back["val_scores"].index(max(back["val_scores"]))
    assert back["labels_used"] == ["class", "group"] and back["head_type"] == "vit_proj"
    json.dumps(loaded.hyperparameters())


def test_group_labels_of_train_are_never_read():
    """Scrambling train's attribute field (so its group ids) changes nothing in the fit."""
    ctx = make_ctx()
    train = ctx.features("train", "preproj")
    rng = np.random.default_rng(0)
    fields = train.fields.clone()
    fields[:, 1] = torch.from_numpy(rng.permutation(fields[:, 1].numpy()))
    assert not torch.equal(fields, train.fields)
    scrambled = make_ctx(train=dataclasses.replace(train, fields=fields))
    a, b = fitted(ctx), fitted(scrambled)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_class_balanced_selection_reads_no_group_labels_at_all():
    ctx = make_ctx()
    rng = np.random.default_rng(1)
    scrambled = {}
    for split in ("train", "val"):
        fs = ctx.features(split, "preproj")
        fields = fs.fields.clone()
        fields[:, 1] = torch.from_numpy(rng.integers(0, 2, len(fs)))
        scrambled[split] = dataclasses.replace(fs, fields=fields)
    a = fitted(ctx, selection="class_balanced")
    b = fitted(make_ctx(train=scrambled["train"], val=scrambled["val"]), selection="class_balanced")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    hp = a.hyperparameters()
    assert hp["labels_used"] == ["class"] and hp["selection_metric"] == "val_class_balanced_acc"
    assert all(kind == "preproj" for _, kind in ctx.reads)


def test_as_open_clip_puts_the_fitted_projection_into_a_copy_of_the_model():
    model = tiny_vit()
    original = model.visual.proj.detach().clone()
    gen = torch.Generator().manual_seed(0)
    tensors = {"proj": original + 0.1 * torch.randn(original.shape, generator=gen)}
    method = CFR()
    method.load_state_dict({"head_type": torch.tensor([0]), **{f"head.{k}": v for k, v in tensors.items()}})
    ctx = argparse.Namespace(model=model)
    adapted = method.as_open_clip(ctx)
    images, text = torch.randn(2, 3, 32, 32), open_clip.get_tokenizer("crp-tiny")(["a circle"])
    with torch.no_grad():
        torch.testing.assert_close(adapted.encode_image(images), preproj_features(model, images) @ tensors["proj"])
        torch.testing.assert_close(adapted.encode_text(text), model.encode_text(text))
    assert torch.equal(model.visual.proj.detach(), original)  # the run's model is untouched
    assert torch.equal(adapted.logit_scale, model.logit_scale)


def test_apply_head_for_attnpool_and_adapter_heads():
    rn = tiny_resnet()
    head = init_head(rn)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre = preproj_features(rn, images)
        expected = head(pre)
    adapted = apply_head(rn, "attnpool", {k: v for k, v in head.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(adapted.encode_image(images), expected)
    vit = tiny_vit()
    wrapped = AdaptedCLIP(vit, torch.nn.Identity())
    adapter = init_head(wrapped, dim=64)
    with torch.no_grad():
        adapter.linear.weight.normal_(0, 0.05)
    out = apply_head(wrapped, "adapter", adapter.state_dict())
    with torch.no_grad():
        emb = vit.encode_image(images[:, :, :32, :32])
        torch.testing.assert_close(out.encode_image(images[:, :, :32, :32]), adapter(emb))
    with pytest.raises(StateError, match="attnpool"):
        apply_head(tiny_vit(), "attnpool", {})


def test_the_loader_rejects_a_state_of_another_base_model(tmp_path):
    path = str(tmp_path / "s.safetensors")
    write_state(path, "cfr", {"head_type": torch.tensor([0]), "head.proj": torch.zeros(96, 64)},
                {"model": "crp-tiny", "pretrained": "spurious_shapes", "hyperparameters": {}})
    with pytest.raises(StateError, match="fitted on --model crp-tiny"):
        load_cfr_model("ViT-B-32", path)
    write_state(path, "dfr", {"coef": torch.zeros(2, 2)}, {"model": "crp-tiny", "pretrained": "x"})
    with pytest.raises(StateError, match="not 'cfr'"):
        load_cfr_model("crp-tiny", path)


def test_plugin_registers_the_mitigation_flags_and_model_loader(crp_plugin_manager):
    registry = crp_plugin_manager.registry  # cfr is a built-in plugin
    assert registry.owner("mitigations", "cfr") == PLUGIN and registry.owner("model_loaders", "cfr") == PLUGIN
    spec = registry.mitigation("cfr")
    assert spec.needs.labels == frozenset({"class", "group"}) and spec.needs.fit_splits == ("train", "val")
    assert "preproj" in spec.needs.feature_kinds
    assert registry.model_loader("cfr").load is load_cfr_model
    assert spec.options is CFRConfig and spec.option_prefix == "cfr_"  # one dataclass: the flags and the config
    parser = argparse.ArgumentParser()
    add_spec_flags(parser, registry, kinds=("mitigations",), only=lambda kind, name: name == "cfr")
    options = parser.parse_args(["--cfr_epochs", "3", "--cfr_selection", "class_balanced"])
    method = spec.create(spec_config(spec, options))
    assert method.config.epochs == 3 and method.config.selection == "class_balanced"
    assert method.config.lr == 1e-4 and method.config.batch_size == 128  # the authors' defaults


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_fit_save_reload_and_model_type_cfr(run_cli, shapes_flags, shapes_root, tiny_pretrained, tmp_path):
    common = ["--model", "crp-tiny", "--pretrained", tiny_pretrained, "--num_workers", "0", "--no_amp",
              "--feature_cache", tmp_path / "cache"]
    cfr_flags = ["--cfr_epochs", "3", "--cfr_erm_epochs", "3", "--cfr_lr", "1e-3", "--cfr_batch_size", "32"]
    rc, out, err = run_cli("eval", *shapes_flags, *common, "--mitigation", "cfr", *cfr_flags,
                           "--save_mitigation_state", "--save_predictions", "--output", tmp_path / "fit.json")
    assert rc == 0, err
    first = json.loads((tmp_path / "fit.json").read_text())
    info = first["robust"]["methods"]["cfr"]
    assert info["needs"]["labels"] == ["class", "group"] and info["hyperparameters"]["labels_used"] == ["class", "group"]
    # what the run context saw it read: train's classes, val's groups (model selection)
    assert info["labels_used"] == {"labels": "group", "splits": {"train": "class", "val": "group"}}
    assert info["hyperparameters"]["epochs"] == 3 and len(info["hyperparameters"]["val_scores"]) == 3
    state_file = tmp_path / "fit_state_cfr.safetensors"
    assert state_file.is_file()

    # reload the fitted state: no fit, identical predictions
    rc, _, err = run_cli("eval", *shapes_flags, *common, "--mitigation", "cfr", "--mitigation_state", state_file,
                         "--save_predictions", "--output", tmp_path / "reload.json")
    assert rc == 0, err
    second = json.loads((tmp_path / "reload.json").read_text())
    assert second["robust"]["methods"]["cfr"]["state_loaded_from"] == str(state_file)
    assert (tmp_path / "fit_predictions.csv").read_text() == (tmp_path / "reload_predictions.csv").read_text()
    assert second["metrics"]["cfr/acc1"] == first["metrics"]["cfr/acc1"]

    # the fitted model as a clip_benchmark model type: plain zero-shot on the shards
    rc, _, err = run_cli("eval", "--dataset", "wds/spurious_shapes", "--dataset_root", shapes_root,
                         "--model_type", "cfr", "--model", "crp-tiny", "--pretrained", state_file,
                         "--num_workers", "0", "--no_amp", "--plugin", PLUGIN,
                         "--feature_cache", tmp_path / "cache2", "--save_predictions", "--output", tmp_path / "as_model.json")
    assert rc == 0, err
    third = json.loads((tmp_path / "as_model.json").read_text())
    assert third["metrics"]["acc1"] == first["metrics"]["cfr/acc1"]
    fit_rows = list(csv.DictReader(open(tmp_path / "fit_predictions.csv")))
    model_rows = list(csv.DictReader(open(tmp_path / "as_model_predictions.csv")))
    assert [(r["key"], r["pred_cfr"]) for r in fit_rows] == [(r["key"], r["pred_zeroshot"]) for r in model_rows]
    # ... and on shards without groups.json (clip_benchmark's layout: class-level metrics, same acc1)
    plain_root = tmp_path / "plain"
    shutil.copytree(shapes_root, plain_root)
    (plain_root / "groups.json").unlink()
    rc, _, err = run_cli("eval", "--dataset", "wds/plain", "--dataset_root", plain_root,
                         "--model_type", "cfr", "--model", "crp-tiny", "--pretrained", state_file,
                         "--num_workers", "0", "--no_amp", "--output", tmp_path / "plain.json")
    assert rc == 0, err
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "no group metadata" in plain["robust"]["note"] and "zeroshot/worst_class_acc" in plain["metrics"]
    assert plain["metrics"]["acc1"] == first["metrics"]["cfr/acc1"]

    # a state of another base model is refused with one line
    rc, _, err = run_cli("eval", "--dataset", "wds/spurious_shapes", "--dataset_root", shapes_root,
                         "--model_type", "cfr", "--model", "ViT-B-32", "--pretrained", state_file,
                         "--num_workers", "0", "--output", tmp_path / "bad.json")
    assert rc == 2 and "fitted on --model crp-tiny" in err
    assert Path(state_file).is_file()


def test_image_features_derived_from_preproj_are_exact_and_save_a_forward():
    from clip_robust_plugins.features.towers import _batch_features

    model = tiny_vit().eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = []
    model.visual.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        both = _batch_features(model, images, ["image", "preproj"])
        assert len(calls) == 1  # one tower forward for both kinds
        alone = _batch_features(model, images, ["image"])
    assert torch.equal(both["image"], alone["image"])  # bit-identical to encode_image
    assert torch.equal(both["preproj"], preproj_features(model, images))
