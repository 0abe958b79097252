"""No silent non-finite numbers: NaN features and NaN logits stop the run with one line and
write nothing; ``--skip_bad_samples`` drops samples with non-finite features and counts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_robust_plugins import Mitigation, MitigationSpec, ModelLoaderSpec, Needs, hookimpl
from clip_robust_plugins.models import ASSETS, load_open_clip

TINY_FILE = ASSETS / "crp-tiny_spurious_shapes.safetensors"


def run_eval(run_cli, shapes_flags, tmp_path: Path, *extra: str) -> tuple[int, str, Path]:
    out = tmp_path / "out" / "results.json"
    rc, _, err = run_cli(
        "eval", *shapes_flags, "--model", "crp-tiny", "--no_amp", "--num_workers", "0", "--quiet",
        "--no_feature_cache", "--save_predictions", "--output", out, *extra,
    )
    return rc, err, out


def test_a_checkpoint_whose_weights_give_nan_stops_the_run(run_cli, shapes_flags, tmp_path):
    tensors = load_file(str(TINY_FILE))
    proj = next(k for k in tensors if k.endswith("visual.proj"))
    tensors[proj] = torch.full_like(tensors[proj], float("nan"))
    broken = tmp_path / "nan.safetensors"
    save_file(tensors, str(broken))
    rc, err, out = run_eval(run_cli, shapes_flags, tmp_path, "--pretrained", str(broken))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "non-finite image features" in lines[0]
    assert "split 'test'" in lines[0] and "sample 'shapes_test_" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


def _half_nan_loader(model_name, pretrained, cache_dir=None, device="cpu", *, registry=None):
    """crp-tiny whose image embeddings are NaN for bright images (a data-dependent failure)."""
    model, transform, tokenizer = load_open_clip("crp-tiny", "spurious_shapes", device=device)
    encode = model.encode_image

    def encode_image(images, normalize=False):
        features = encode(images, normalize=normalize)
        bright = images.mean(dim=(1, 2, 3)) > images.mean()
        return torch.where(bright[:, None], torch.full_like(features, float("nan")), features)

    model.encode_image = encode_image
    return model, transform, tokenizer


class HalfNanPlugin:
    @hookimpl
    def register_model_loaders(self, register):
        register(ModelLoaderSpec("test_half_nan", _half_nan_loader, "crp-tiny with NaN features on bright images"))


def test_skip_bad_samples_drops_non_finite_rows_and_counts_them(crp_plugin_manager, crp_eval):
    crp_plugin_manager.register(HalfNanPlugin(), name="half_nan")
    with pytest.raises(pytest.fail.Exception):  # without the flag: the run stops
        crp_eval("--model_type", "test_half_nan")
    results = crp_eval("--model_type", "test_half_nan", "--skip_bad_samples")
    skipped = results["robust"]["skipped_samples"]["test"]
    counts = [v for k, v in results["metrics"].items() if k.startswith("zeroshot/group_count/")]
    assert 0 < skipped["count"] < 24 and sum(counts) == 24 - skipped["count"]
    assert results["robust"]["feature_cache"] == [] or all("test" not in p for p in results["robust"]["feature_cache"])


class NanLogits(Mitigation):
    def fit(self, ctx):
        pass

    def predict(self, ctx, split):
        logits = ctx.zeroshot_logits(ctx.features(split).features)
        logits[3, 1] = float("nan")
        return logits


class NanPlugin:
    @hookimpl
    def register_mitigations(self, register):
        register(MitigationSpec("test_nan", create=lambda options: NanLogits(), needs=Needs()))


def test_a_mitigation_returning_nan_logits_stops_the_run(crp_plugin_manager, run_cli, shapes_flags, tmp_path, monkeypatch):
    from clip_robust_plugins import cli

    crp_plugin_manager.register(NanPlugin(), name="nan_plugin")
    monkeypatch.setattr(cli, "build_plugin_manager", lambda *a, **k: crp_plugin_manager.pm)
    rc, err, out = run_eval(run_cli, shapes_flags, tmp_path, "--pretrained", "spurious_shapes", "--mitigation", "test_nan")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "'test_nan'" in lines[0] and "'nan_plugin'" in lines[0] and "non-finite logits" in lines[0]
    assert not out.exists() and not Path(str(out).replace(".json", "_predictions.csv")).exists()


def test_results_are_written_when_all_is_finite(run_cli, shapes_flags, tmp_path):
    rc, err, out = run_eval(run_cli, shapes_flags, tmp_path, "--pretrained", "spurious_shapes")
    assert rc == 0, err
    assert json.loads(out.read_text())["metrics"]["zeroshot/acc"] > 0
