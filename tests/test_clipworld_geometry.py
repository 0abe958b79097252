"""The shipped crp-world behaves like CLIP on a small generated split of its world (issue 18's three figures)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from clip_robust_plugins.datasets.clipworld.geometry import (
    balanced_draws,
    image_features,
    measure,
    render_draws,
    to_tensor,
)
from clip_robust_plugins.datasets.clipworld.tasks import WorldTaskConfig, iter_split, resolve
from clip_robust_plugins.models import load_open_clip


@pytest.fixture(scope="module")
def world_model():
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    model, transform, tokenizer = load_open_clip("crp-world", "clipworld")
    model.eval()
    yield model, transform, tokenizer
    torch.set_num_threads(saved)


def test_native_size_tensor_matches_open_clip_preprocess(world_model):
    model, transform, _ = world_model
    from PIL import Image

    pixels = render_draws(np.random.default_rng(3), balanced_draws(np.random.default_rng(3), 2), 48)
    ours = to_tensor(pixels, model.visual.image_mean, model.visual.image_std)
    theirs = np.stack([transform(Image.fromarray(p)).numpy() for p in pixels])
    assert np.allclose(ours.numpy(), theirs, atol=1e-5)


def _figures(world_model) -> dict:
    model, _, tokenizer = world_model
    mean, std = model.visual.image_mean, model.visual.image_std
    rng = np.random.default_rng([7, 1])
    draws = balanced_draws(rng, 480)
    feats = image_features(model, to_tensor(render_draws(rng, draws, 48), mean, std))
    config = resolve(WorldTaskConfig(preset="waterbirds_like", test_size=240, seed=5), argparse.Namespace())
    samples = list(iter_split(config, "test"))
    pixels = np.stack([np.asarray(s[1]) for s in samples])
    y = np.array([s[2]["y"] for s in samples])
    a = np.array([s[2]["a"] for s in samples])
    out = measure(model, tokenizer, feats, draws, image_features(model, to_tensor(pixels, mean, std)), y, a,
                  config.class_values)
    return out


def test_margins_are_clip_like_and_scenes_are_recognised(world_model):
    out = _figures(world_model)
    assert 1.0 <= out["margin_median"] <= 10.0, out
    assert out["scene_acc"] >= 0.8, out


def test_shapes_are_recognised_and_the_planted_shortcut_shows(world_model):
    out = _figures(world_model)
    assert out["shape_acc"] >= 0.8, out
    assert out["shortcut_mean_acc"] - out["shortcut_worst_group_acc"] >= 0.15, out
    # the shape counts too, not the scene alone: a scene-only model scores 0.5 on these balanced groups
    assert out["shortcut_mean_acc"] >= 0.6, out


def test_shipped_patch_fine_tune_learned_the_marker_and_the_base_did_not():
    """``clipworld_patch_ft`` passes RaVL's validity check on the patch task; ``clipworld`` does not."""
    import torch

    from clip_robust_plugins.datasets.clipworld.geometry import zeroshot_head
    from clip_robust_plugins.mitigations.ravl.discovery import validity_check

    config = resolve(WorldTaskConfig(preset="patch"), argparse.Namespace())  # the preset's own test split
    samples = list(iter_split(config, "test"))
    pixels = np.stack([np.asarray(s[1]) for s in samples])
    y = np.array([s[2]["y"] for s in samples])
    marked = np.array([s[2]["a"] for s in samples]) == 1
    checks = {}
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for tag in ("clipworld", "clipworld_patch_ft"):
            model, _, tokenizer = load_open_clip("crp-world", tag)
            model.eval()
            head = zeroshot_head(model, tokenizer, config.class_field, config.class_values)
            feats = image_features(model, to_tensor(pixels, model.visual.image_mean, model.visual.image_std))
            checks[tag] = validity_check((feats @ head.T).argmax(1), y, marked, config.classnames)
    finally:
        torch.set_num_threads(saved)
    fine_tuned = checks["clipworld_patch_ft"]
    assert fine_tuned["valid"] and fine_tuned["favoured_class"] == "circle", fine_tuned
    assert fine_tuned["favoured_gap"] > 0.10 and fine_tuned["other_classes_gap"] < -0.10, fine_tuned
    assert not checks["clipworld"]["valid"], checks["clipworld"]
