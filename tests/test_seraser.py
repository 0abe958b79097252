"""SEraser: prompt features, losses, batched == per-image tuning, view providers, and the CLI."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_robust_plugins.datasets.base import DatasetError, SampleImage
from clip_robust_plugins.datasets.spurious_shapes import TEMPLATES, ShapesConfig, iter_split
from clip_robust_plugins.mitigations.seraser import (
    AugmentViews,
    MaskViews,
    PromptEncoder,
    ProviderImages,
    SEraser,
    SEraserConfig,
    SEraserError,
    ViewOptions,
    background_loss,
    entropy_loss,
    kl_to_reference,
    view_kind,
)
from clip_robust_plugins.plugins import PluginError
from clip_robust_plugins.specs import SampleViews

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one torch thread is far faster

CLASSES = ["square", "diamond"]
TINY = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--num_workers", "0", "--no_amp"]




def shape_samples(n: int = 4) -> list[SampleImage]:
    config = ShapesConfig(train_size=8, val_size=8, test_size=8)
    out = []
    for key, image, values, extra, mask in iter_split(config, "test"):
        out.append(SampleImage(key, image, {**values, **extra}, mask))
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------- text side


def test_untuned_prompt_features_equal_encode_text(crp_tiny_model):
    model, _, tokenizer = crp_tiny_model
    encoder = PromptEncoder(model, tokenizer, CLASSES, ctx_init="a photo of", class_prompt="a {c}.")
    # with the default template choice the prompts are exactly the dataset's first template
    assert encoder.prompts == [TEMPLATES[0].format(c=c) for c in CLASSES]
    assert encoder.n_ctx == 3
    with torch.no_grad():
        ours = encoder.encode(encoder.init_ctx.unsqueeze(0))[0]
        reference = F.normalize(model.encode_text(tokenizer(encoder.prompts)), dim=-1)
    assert ours.shape == reference.shape == (2, 64)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    # without the trailing period the class prompt is a different sentence, and still exact
    bare = PromptEncoder(model, tokenizer, CLASSES, class_prompt="a {c}")
    with torch.no_grad():
        torch.testing.assert_close(
            bare.encode(bare.init_ctx.unsqueeze(0))[0],
            F.normalize(model.encode_text(tokenizer(["a photo of a square", "a photo of a diamond"])), dim=-1),
            atol=1e-6, rtol=0,
        )
        assert not torch.allclose(bare.encode(bare.init_ctx.unsqueeze(0))[0], ours, atol=1e-4)


def test_prompt_features_depend_on_each_images_context(crp_tiny_model):
    model, _, tokenizer = crp_tiny_model
    encoder = PromptEncoder(model, tokenizer, CLASSES)
    ctx = encoder.init_ctx.unsqueeze(0).repeat(2, 1, 1)
    ctx[1] += 0.05 * torch.randn(ctx.shape[1:], generator=torch.Generator().manual_seed(0))
    ctx.requires_grad_(True)
    text = encoder.encode(ctx)
    assert text.shape == (2, 2, 64)
    assert not torch.allclose(text[0], text[1])
    (grad,) = torch.autograd.grad(text[0].sum(), ctx)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0  # row b sees only image b's context
    assert all(p.grad is None for p in model.parameters())


def test_random_init_and_inconsistent_n_ctx(crp_tiny_model):
    model, _, tokenizer = crp_tiny_model
    encoder = PromptEncoder(model, tokenizer, CLASSES, ctx_init="", n_ctx=4, generator=torch.Generator().manual_seed(0))
    assert encoder.n_ctx == 4 and encoder.init_ctx.shape == (4, 64)
    assert encoder.prompts[0] == "X X X X a square."
    with pytest.raises(SEraserError, match="is 3 tokens"):
        PromptEncoder(model, tokenizer, CLASSES, ctx_init="a photo of", n_ctx=2)


class _Stub(torch.nn.Module):
    def __init__(self, **parts):
        super().__init__()
        for name, value in parts.items():
            setattr(self, name, value)


def test_towers_without_the_standard_parts_are_refused_by_name():
    emb = torch.nn.Embedding(10, 4)
    parts = dict(token_embedding=emb, positional_embedding=torch.zeros(5, 4), transformer=torch.nn.Identity(),
                 text_projection=torch.zeros(4, 4))
    with pytest.raises(SEraserError, match="`ln_final`"):
        PromptEncoder(_Stub(**parts), lambda t: torch.zeros(len(t), 5, dtype=torch.long), CLASSES)
    with pytest.raises(SEraserError, match="`token_embedding`"):
        PromptEncoder(_Stub(), lambda t: None, CLASSES)
    coca_like = _Stub(text=_Stub(**parts, ln_final=torch.nn.Identity(), cls_emb=torch.nn.Parameter(torch.zeros(4))))
    with pytest.raises(SEraserError, match="class token"):
        PromptEncoder(coca_like, lambda t: None, CLASSES)


def test_custom_text_clip_tower_is_supported():
    model = open_clip.CustomTextCLIP(
        16, open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, image_size=16, patch_size=8),
        open_clip.model.CLIPTextCfg(context_length=12, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=12)
    encoder = PromptEncoder(model, tokenizer, CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode(encoder.init_ctx.unsqueeze(0))[0],
            F.normalize(model.encode_text(tokenizer(encoder.prompts)), dim=-1), atol=1e-6, rtol=0,
        )


# ----------------------------------------------------------------------------- losses and tuning


def test_losses_match_their_definitions():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])  # (B=1, V=2, C=3)
    p = logits.softmax(-1)
    kl_u = (torch.full((3,), 1 / 3) * (torch.log(torch.full((3,), 1 / 3)) - p.log())).sum(-1).mean(-1)
    torch.testing.assert_close(background_loss(logits), kl_u)
    assert float(background_loss(logits[:, 1:])) == pytest.approx(0.0, abs=1e-7)
    assert float(entropy_loss(logits[:, 1:])) == pytest.approx(math.log(3))
    ref = F.log_softmax(logits, -1)
    assert float(kl_to_reference(logits, ref)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_to_reference(logits, ref.flip(-1))) > 0


def _features(n: int, views: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, views, 64, generator=g), dim=-1)


def test_batched_tuning_equals_the_per_image_loop(crp_tiny_model):
    model, _, tokenizer = crp_tiny_model
    encoder = PromptEncoder(model, tokenizer, CLASSES)
    fg, bg = _features(10, 2, 2), _features(10, 2, 3)
    raw = F.normalize(fg[:, 0] + 2 * bg[:, 0], dim=-1)  # the raw image leans on its background
    black = _features(1, 1, 4)[0, 0]
    results = {}
    for size in (10, 4, 1):
        cfg = SEraserConfig(steps=6, lr=1e-2, batch_size=size)
        out = SEraser(cfg).tune(encoder, raw, fg, bg, black, scale=100.0)
        results[size] = (torch.cat([r.logits for r in out]), torch.cat([r.untuned_logits for r in out]))
    batched, untuned = results[10]
    assert (batched.argmax(1) != untuned.argmax(1)).any()  # the tuning does change predictions here
    for size in (4, 1):
        assert torch.equal(results[size][0].argmax(1), batched.argmax(1))
        torch.testing.assert_close(results[size][0], batched, atol=1e-3, rtol=1e-4)
    # the KL foreground term is batched the same way
    kl = {s: torch.cat([r.logits for r in SEraser(SEraserConfig(steps=4, lr=1e-2, fg_loss="kl", batch_size=s))
                        .tune(encoder, raw, fg, bg, None, scale=100.0)]) for s in (10, 1)}
    assert torch.equal(kl[10].argmax(1), kl[1].argmax(1))
    torch.testing.assert_close(kl[1], kl[10], atol=1e-3, rtol=1e-4)


def test_zero_steps_is_the_untuned_prompt(crp_tiny_model):
    model, _, tokenizer = crp_tiny_model
    encoder = PromptEncoder(model, tokenizer, CLASSES)
    raw = _features(5, 1)[:, 0]
    (out,) = SEraser(SEraserConfig(steps=0)).tune(encoder, raw, _features(5, 1), _features(5, 1), None, scale=100.0)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(encoder.prompts)), dim=-1)
    torch.testing.assert_close(out.logits, 100.0 * raw @ text.T, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- view providers


def test_mask_views_are_shaped_filled_and_deterministic():
    provider = MaskViews(ViewOptions(), seed=0)
    assert (provider.n_foreground, provider.n_background) == (1, 1)
    for sample in shape_samples():
        views = provider(sample)
        assert len(views.foreground) == 1 and len(views.background) == 1
        fg, bg = (np.array(v[0]) for v in (views.foreground, views.background))
        pixels, mask = np.array(sample.image), np.array(sample.mask) > 127
        assert fg.shape == bg.shape == pixels.shape
        assert (fg[~mask] == 0).all() and (fg[mask] == pixels[mask]).all()  # object on black
        assert (bg[~mask] == pixels[~mask]).all()
        expected = np.rint(pixels[~mask].astype(np.float32).mean(axis=0))
        assert (bg[mask] == expected).all()  # the hole takes the background's mean colour: no silhouette
        again = provider(sample)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(views.background, again.background))


def test_augmented_views_depend_on_seed_and_key_only():
    samples = shape_samples(2)
    provider = AugmentViews(ViewOptions(), seed=0)
    assert (provider.n_foreground, provider.n_background) == (1, 5)  # raw | raw + 4 strong augmentations
    views = provider(samples[0])
    assert views.foreground[0].tobytes() == samples[0].image.tobytes() == views.background[0].tobytes()
    assert len({v.tobytes() for v in views.background}) == 5
    assert [v.tobytes() for v in AugmentViews(ViewOptions(), seed=0)(samples[0]).background] == [
        v.tobytes() for v in views.background]
    assert [v.tobytes() for v in AugmentViews(ViewOptions(), seed=1)(samples[0]).background] != [
        v.tobytes() for v in views.background]
    masked = MaskViews(ViewOptions(n_aug=2, n_fg_aug=1), seed=0)
    mv = masked(samples[1])
    assert (len(mv.foreground), len(mv.background)) == (2, 3)
    assert "seed=0" in masked.config and "seed" not in MaskViews(ViewOptions(), seed=0).config


def test_box_views_and_missing_annotations():
    sample = shape_samples(1)[0]
    views = MaskViews(ViewOptions(), "box")(sample)
    x0, y0, x1, y1 = sample.meta["box"]
    fg = np.array(views.foreground[0])
    assert (fg[y0:y1, x0:x1] == np.array(sample.image)[y0:y1, x0:x1]).all()
    assert fg[:y0].sum() == 0 and fg[y1:].sum() == 0
    bare = SampleImage("k0", sample.image, {"y": 0, "a": 1}, None)
    with pytest.raises(DatasetError, match="'k0': no foreground mask"):
        MaskViews(ViewOptions())(bare)
    with pytest.raises(DatasetError, match="'k0': no 'box'"):
        MaskViews(ViewOptions(), "box")(bare)


def test_provider_contract_is_checked():
    class Bad:
        n_foreground, n_background, config = 1, 2, "bad"

        def __call__(self, sample):
            return SampleViews((sample.image,), (sample.image,))

    kind = view_kind(Bad(), "bad")
    assert kind.count == 3 and kind.name.startswith("seraser_views/bad-")
    with pytest.raises(PluginError, match="'bad'.*1 background views, declared 1 and 2"):
        kind.derive(shape_samples(1)[0])

    class NoCounts:
        config = "x"

    with pytest.raises(PluginError, match="`n_foreground`"):
        ProviderImages(NoCounts(), "nocounts")


# ----------------------------------------------------------------------------- end to end


def test_cli_eval_records_the_view_provider(run_cli, shapes_flags, tmp_path):
    out = tmp_path / "res.json"
    rc, stdout, _ = run_cli(
        "eval", *shapes_flags, *TINY, "--mitigation", "seraser", "--seraser_steps", "3", "--seraser_lr", "1e-2",
        "--feature_cache", tmp_path / "cache", "--output", out,
    )
    assert rc == 0 and "seraser" in stdout
    dump = json.loads(out.read_text())
    info = dump["robust"]["methods"]["seraser"]
    assert info["plugin"] == "clip_robust_plugins.mitigations.seraser"
    assert info["needs"]["labels"] == [] and info["needs"]["fit_splits"] == [] and info["needs"]["live_model"]
    hp = info["hyperparameters"]
    assert hp["view_provider"] == "masks" and hp["view_provider_plugin"] == "clip_robust_plugins.mitigations.seraser"
    assert hp["views"] == "auto" and hp["view_provider_reason"].startswith("auto: every sample")
    assert hp["steps"] == 3 and hp["n_images"] == 32 and hp["n_background_views"] == 2
    assert 0.0 <= dump["metrics"]["seraser/worst_group_acc"] <= 1.0
    extracted = dump["robust"]["features_extracted"]
    assert {e["split"] for e in extracted} == {"test"}  # test-time only
    # feature_plan: the test split's views are planned (extracted before the method runs)
    kinds = [k for e in extracted for k in e["kinds"]]
    assert kinds[0] == "image" and len(kinds) == 2 and kinds[1].startswith("seraser_views/masks-")
    diagnostics = hp["diagnostics"]
    assert diagnostics["ctx_relative_change"]["max"] > 0.0
    assert -1.0 <= diagnostics["text_cosine_tuned_vs_untuned_min_over_classes"]["min"] <= 1.0
    assert diagnostics["untuned_margin"]["min"] >= 0.0


def test_third_party_view_provider_plugin(run_cli, shapes_flags, tmp_path, monkeypatch):
    (tmp_path / "quadrant_views.py").write_text(textwrap.dedent('''
        from clip_robust_plugins import SampleViews, ViewProviderSpec, hookimpl

        class Quadrants:
            n_foreground, n_background = 1, 3
            config = "quadrants-v1"

            def __call__(self, sample):
                w, h = sample.image.size
                crops = [sample.image.crop(b).resize((w, h)) for b in
                         [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]]
                return SampleViews(foreground=(crops[0],), background=tuple(crops[1:]))

        @hookimpl
        def register_view_providers(register):
            register(ViewProviderSpec("quadrants", lambda options: Quadrants(), "test: image quadrants"))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "res.json"
    rc, _, err = run_cli(
        "eval", *shapes_flags, *TINY, "--plugin", "quadrant_views", "--mitigation", "seraser",
        "--seraser_views", "quadrants", "--seraser_steps", "2", "--feature_cache", tmp_path / "cache", "--output", out,
    )
    assert rc == 0, err
    hp = json.loads(out.read_text())["robust"]["methods"]["seraser"]["hyperparameters"]
    assert hp["view_provider"] == "quadrants" and hp["view_provider_plugin"] == "quadrant_views"
    assert hp["view_provider_config"] == "quadrants-v1" and hp["n_background_views"] == 4
    rc, _, err = run_cli("eval", *shapes_flags, *TINY, "--mitigation", "seraser", "--seraser_views", "nope",
                         "--output", tmp_path / "nope.json")
    assert rc == 2 and "unknown view provider 'nope'" in err and not (tmp_path / "nope.json").exists()


def test_views_are_not_images_of_other_sizes():
    provider = MaskViews(ViewOptions())
    sample = shape_samples(1)[0]
    wrong = SampleImage(sample.key, sample.image, sample.meta, Image.new("L", (8, 8)))
    with pytest.raises(DatasetError, match="mask of size"):
        provider(wrong)


def test_cpu_threads_are_restored_after_tuning():
    from clip_robust_plugins.mitigations.seraser import cpu_threads

    torch.set_num_threads(2)
    with cpu_threads(1, "cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with cpu_threads(0, "cpu"):
        assert torch.get_num_threads() == 2
