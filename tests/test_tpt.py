"""TPT: confidence selection and the marginal entropy against numpy, batched == per-image tuning,
the seeded views, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_robust_plugins.datasets.base import SampleImage
from clip_robust_plugins.mitigations.seraser import PromptEncoder
from clip_robust_plugins.mitigations.tpt import (
    CropViews,
    Tpt,
    TptConfig,
    crop_box,
    marginal_entropy,
    select_confident,
    tune_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one torch thread is far faster

CLASSES = ["square", "diamond"]
TINY = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--num_workers", "0", "--no_amp"]


def _features(n: int, views: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, views, 64, generator=g), dim=-1)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(axis=-1)


# ----------------------------------------------------------------------------- selection and loss


def test_selection_and_marginal_entropy_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(3, 10, 4))
    k = 3
    p = _np_softmax(logits)
    expected_idx = np.sort(np.argsort(_np_entropy(p), axis=1)[:, :k], axis=1)
    idx = select_confident(torch.tensor(logits), k)
    assert idx.shape == (3, k)
    np.testing.assert_array_equal(np.sort(idx.numpy(), axis=1), expected_idx)
    # the entropy of the mean of the kept views' probabilities, not the mean of their entropies
    kept = np.take_along_axis(logits, expected_idx[..., None], axis=1)
    expected = _np_entropy(_np_softmax(kept).mean(axis=1))
    got = marginal_entropy(torch.tensor(kept)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(got, _np_entropy(_np_softmax(kept)).mean(axis=1))


def test_marginal_entropy_of_saturated_views_is_finite():
    logits = torch.tensor([[[1e4, -1e4], [1e4, -1e4]]], dtype=torch.float32)
    value = marginal_entropy(logits)
    assert torch.isfinite(value).all() and float(value) == pytest.approx(0.0, abs=1e-6)


def test_tuning_keeps_the_views_numpy_chooses(crp_tiny_model):
    model, _, tokenizer = crp_tiny_model
    encoder = PromptEncoder(model, tokenizer, CLASSES, ctx_init="a photo of a", class_prompt="{c}.")
    image, views = _features(3, 1, 1)[:, 0], _features(3, 19, 2)
    config = TptConfig(views=19, steps=0)  # 20 candidates, int(20 * 0.1) = 2 kept
    out = tune_batch(encoder, image, views, config, scale=20.0)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(encoder.prompts)), dim=-1).numpy()
    candidates = np.concatenate([image.numpy()[:, None], views.numpy()], axis=1)
    logits = 20.0 * candidates @ text.T
    order = np.argsort(_np_entropy(_np_softmax(logits)), axis=1)[:, :2]
    expected = _np_entropy(_np_softmax(np.take_along_axis(logits, order[..., None], axis=1)).mean(axis=1))
    np.testing.assert_allclose(out.loss_first.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.original_kept.numpy(), (order == 0).any(axis=1))
    # zero steps: the prediction is the untuned prompt's
    np.testing.assert_allclose(out.logits.numpy(), 20.0 * image.numpy() @ text.T, rtol=1e-4, atol=1e-4)


def test_defaults_are_the_papers():
    c = TptConfig()
    assert (c.views, c.selection, c.steps, c.lr, c.weight_decay) == (63, 0.1, 1, 5e-3, 0.01)
    assert (c.ctx_init, c.n_ctx, c.class_prompt, c.logit_scale) == ("a photo of a", None, "{c}.", "model")


def test_selected_count_follows_the_authors_rounding():
    assert TptConfig().n_selected == 6  # int(64 * 0.1)
    assert TptConfig(views=3, selection=0.1).n_selected == 1  # never zero views
    assert TptConfig(views=9, selection=1.0).n_selected == 10
    with pytest.raises(ValueError, match="selection"):
        TptConfig(selection=0.0)


# ----------------------------------------------------------------------------- batched == per image


def test_batched_tuning_equals_the_per_image_loop(crp_tiny_model):
    model, _, tokenizer = crp_tiny_model
    encoder = PromptEncoder(model, tokenizer, CLASSES, ctx_init="a photo of a", class_prompt="{c}.")
    # views scattered around a centre the image is a noisy copy of: kept views mostly agree
    centre = _features(12, 1, 4)[:, 0]
    views = F.normalize(centre.unsqueeze(1) + 0.9 * _features(12, 15, 3), dim=-1)
    image = F.normalize(centre + _features(12, 1, 7)[:, 0], dim=-1)
    for config_kwargs, changes in ((dict(steps=3, lr=5e-2), True), (dict(), False)):
        results = {}
        for size in (12, 5, 1):
            config = TptConfig(views=15, selection=0.25, batch_size=size, **config_kwargs)
            out = Tpt(config).tune(encoder, image, views, scale=30.0)
            results[size] = {f: torch.cat([getattr(r, f) for r in out]) for f in ("logits", "untuned_logits",
                                                                                "loss_after", "original_kept")}
        batched = results[12]
        if changes:  # the tuning does change predictions here, so equality below can fail
            assert (batched["logits"].argmax(1) != batched["untuned_logits"].argmax(1)).any()
        assert not torch.allclose(batched["logits"], batched["untuned_logits"])
        for size in (5, 1):
            assert torch.equal(results[size]["logits"].argmax(1), batched["logits"].argmax(1))
            torch.testing.assert_close(results[size]["logits"], batched["logits"], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(results[size]["loss_after"], batched["loss_after"], atol=1e-5, rtol=1e-5)
            assert torch.equal(results[size]["original_kept"], batched["original_kept"])


def test_one_step_lowers_the_marginal_entropy(crp_tiny_model):
    model, _, tokenizer = crp_tiny_model
    encoder = PromptEncoder(model, tokenizer, CLASSES, ctx_init="a photo of a", class_prompt="{c}.")
    views = _features(16, 63, 5)
    (out,) = Tpt(TptConfig()).tune(encoder, views[:, 0], views, scale=20.0)
    assert out.ctx_change.min() > 0
    assert float((out.loss_after < out.loss_first).float().mean()) >= 0.75


# ----------------------------------------------------------------------------- views


def _sample(key: str = "k0", size: tuple[int, int] = (40, 30)) -> SampleImage:
    pixels = np.random.default_rng(1).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return SampleImage(key, Image.fromarray(pixels, mode="RGB"), {}, None)


def test_views_are_seeded_by_seed_and_key_only():
    sample = _sample()
    a = CropViews(8, seed=0)(sample)
    assert len(a) == 8 and {v.size for v in a} == {(30, 30)}  # squares of the shorter side
    again = CropViews(8, seed=0)(sample)
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, again))
    for other in (CropViews(8, seed=1)(sample), CropViews(8, seed=0)(_sample("k1"))):
        assert not all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, other))
    state = torch.random.get_rng_state()
    CropViews(4, seed=3)(sample)
    assert torch.equal(state, torch.random.get_rng_state())  # no global generator drawn from


def test_crop_boxes_stay_inside_and_fall_back_to_the_centre():
    rng = np.random.default_rng(0)
    boxes = np.array([crop_box(40, 30, 0.08, rng) for _ in range(500)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 30).all() and (left + w <= 40).all()
    area = h * w / (40 * 30)
    assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.2
    # scale 1 on a square image: every try but aspect 1 overflows; the fallback is the whole image
    assert crop_box(32, 32, 1.0, np.random.default_rng(0)) == (0, 0, 32, 32)
    # too wide an image: the centred box of the widest allowed ratio
    assert crop_box(100, 10, 1.0, np.random.default_rng(0)) == (0, 43, 10, 13)


# ----------------------------------------------------------------------------- end to end


def test_cli_eval_runs_tpt_without_labels(run_cli, shapes_flags, tmp_path):
    out = tmp_path / "res.json"
    rc, stdout, _ = run_cli(
        "eval", *shapes_flags, *TINY, "--mitigation", "tpt", "--tpt_views", "19", "--tpt_batch_size", "8",
        "--feature_cache", tmp_path / "cache", "--output", out,
    )
    assert rc == 0 and "tpt" in stdout
    dump = json.loads(out.read_text())
    info = dump["robust"]["methods"]["tpt"]
    assert info["plugin"] == "clip_robust_plugins.mitigations.tpt"
    assert info["needs"]["labels"] == [] and info["needs"]["fit_splits"] == [] and info["needs"]["live_model"]
    hp = info["hyperparameters"]
    assert hp["views"] == 19 and hp["n_views_with_image"] == 20 and hp["n_selected"] == 2 and hp["n_images"] == 32
    assert hp["prompts"] == ["a photo of a square.", "a photo of a diamond."] and hp["n_ctx_used"] == 4
    assert hp["diagnostics"]["ctx_relative_change"]["max"] > 0.0
    extracted = dump["robust"]["features_extracted"]
    assert {e["split"] for e in extracted} == {"test"}  # test-time only, one pass
    kinds = [k for e in extracted for k in e["kinds"]]
    assert kinds[0] == "image" and len(kinds) == 2 and kinds[1].startswith("tpt_views/crops-")
    assert 0.0 <= dump["metrics"]["tpt/worst_group_acc"] <= 1.0


def test_inconsistent_context_is_refused_before_extraction(run_cli, shapes_flags, tmp_path):
    rc, _, err = run_cli(
        "eval", *shapes_flags, *TINY, "--mitigation", "tpt", "--tpt_n_ctx", "3",
        "--feature_cache", tmp_path / "cache", "--output", tmp_path / "res.json",
    )
    assert rc == 2 and "--tpt_n_ctx 3" in err and "4 tokens" in err
    assert not (tmp_path / "res.json").exists() and not (tmp_path / "cache").exists()


def test_empty_init_tunes_four_random_context_vectors(run_cli, shapes_flags, tmp_path):
    out = tmp_path / "res.json"
    rc, _, err = run_cli(
        "eval", *shapes_flags, *TINY, "--mitigation", "tpt", "--tpt_views", "3", "--tpt_ctx_init", "",
        "--feature_cache", tmp_path / "cache", "--output", out,
    )
    assert rc == 0, err[-2000:]
    hp = json.loads(out.read_text())["robust"]["methods"]["tpt"]["hyperparameters"]
    assert hp["n_ctx_used"] == 4 and hp["prompts"][0] == "X X X X square." and hp["n_selected"] == 1
