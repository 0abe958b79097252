"""The mitigation interface: the open_clip-compatible wrapper and the ERM head through the engine's context."""

from __future__ import annotations

import pytest
import torch
from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier

from clip_robust_plugins import AdaptedCLIP, RunContext
from clip_robust_plugins.datasets.wds import GroupedShards
from clip_robust_plugins.features import FeatureCache, FeatureExtractor
from clip_robust_plugins.mitigations.erm_head import ERMHead
from clip_robust_plugins.models import load_open_clip


@pytest.fixture(scope="module")
def tiny():
    model, transform, tokenizer = load_open_clip("crp-tiny", "spurious_shapes")
    return model.eval(), transform, tokenizer


def make_ctx(tiny, root, seed=0) -> RunContext:
    model, transform, tokenizer = tiny
    dataset = GroupedShards(root)
    extractor = FeatureExtractor(
        model, transform, model_type="open_clip", model_name="crp-tiny", pretrained="spurious_shapes",
        amp=False, cache=FeatureCache(None), progress=False,
    )
    return RunContext(
        dataset=dataset, dataset_name="robust/spurious_shapes", classnames=dataset.classnames,
        templates=dataset.templates, load_model=lambda: tiny, extractor=extractor, registry=None,
        device="cpu", amp=False, seed=seed, eval_split="test", progress=False,
    )


class Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x


def test_adapted_clip_runs_clip_benchmark_zero_shot(tiny, shapes_root):
    model, transform, tokenizer = tiny
    dataset = GroupedShards(shapes_root)
    loader = torch.utils.data.DataLoader(
        dataset.samples("test", transform), batch_size=16, collate_fn=lambda b: (torch.stack([x[1] for x in b]), torch.stack([x[2][0] for x in b]))
    )
    wrapped = AdaptedCLIP(model, Scale(3.0)).eval()
    assert isinstance(wrapped.logit_scale, torch.Tensor)
    head_base = zero_shot_classifier(model, tokenizer, dataset.classnames, dataset.templates, "cpu", amp=False)
    head_wrapped = zero_shot_classifier(wrapped, tokenizer, dataset.classnames, dataset.templates, "cpu", amp=False)
    assert torch.allclose(head_base, head_wrapped)  # text tower untouched
    logits_base, y = run_classification(model, head_base, loader, "cpu", amp=False)
    logits_wrapped, _ = run_classification(wrapped, head_wrapped, loader, "cpu", amp=False)
    # a positive scale vanishes under L2 normalisation: same scores
    assert torch.allclose(logits_base, logits_wrapped, atol=1e-4)
    assert len(y) == 32
    images = next(iter(loader))[0][:4]
    assert torch.allclose(wrapped.encode_image(images), 3.0 * model.encode_image(images), atol=1e-5)


def test_erm_head_fit_predict_state_roundtrip(tiny, shapes_root):
    ctx = make_ctx(tiny, shapes_root)
    head = ERMHead()
    head.fit(ctx)
    logits = head.predict(ctx, "test")
    assert logits.shape == (32, 2)
    train = ctx.features("train")
    train_acc = (head.predict(ctx, "train").argmax(1) == train.y).float().mean().item()
    assert train_acc > 0.9  # it really fitted the training split
    restored = ERMHead()
    restored.load_state_dict(head.state_dict())
    assert torch.equal(restored.predict(ctx, "test"), logits)
    with pytest.raises(RuntimeError, match="before fit"):
        ERMHead().predict(ctx, "test")


def test_context_generators_are_local_and_seeded(tiny, shapes_root):
    state = torch.random.get_rng_state()
    a, b, c = make_ctx(tiny, shapes_root, 1), make_ctx(tiny, shapes_root, 1), make_ctx(tiny, shapes_root, 2)
    assert a.rng("x").integers(1 << 30) == b.rng("x").integers(1 << 30)
    assert a.rng("x").integers(1 << 30) != c.rng("x").integers(1 << 30)
    assert a.rng("x").integers(1 << 30) != a.rng("y").integers(1 << 30)
    assert torch.equal(torch.rand(3, generator=a.torch_generator("t")), torch.rand(3, generator=b.torch_generator("t")))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not touched




@pytest.mark.parametrize("amp", [False, True])
def test_own_zeroshot_head_equals_clip_benchmarks(tiny, amp):
    """features.towers.zeroshot_classifier replaces clip_benchmark's (whose module imports
    scikit-learn): the same head, bit for bit, for template lists and CuPL-style dicts."""
    from clip_robust_plugins.features.towers import zeroshot_classifier

    model, _, tokenizer = tiny
    classnames = ["square", "diamond"]
    templates = ["a photo of a {c}.", "a {c} on the grass.", "a small {c}"]
    per_class = {"square": ["a square", "four equal sides"], "diamond": ["a diamond", "a rhombus standing on a tip"]}
    for prompts in (templates, per_class):
        ours = zeroshot_classifier(model, tokenizer, classnames, prompts, "cpu", amp=amp)
        theirs = zero_shot_classifier(model, tokenizer, classnames, prompts, "cpu", amp=amp)
        assert ours.shape == theirs.shape == (model.text_projection.shape[1], 2)
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="list or a dict"):
        zeroshot_classifier(model, tokenizer, classnames, "a {c}", "cpu", amp=False)
