"""One line for every model mistake: a misspelt ``--pretrained`` tag (the model's real tags and
the close match), a model name open_clip does not know, a missing checkpoint file, and a file
that does not fit the architecture (naming the file and the first mismatched key).  Exit 2,
nothing extracted, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_robust_plugins.models import ASSETS, first_mismatch

TINY_FILE = ASSETS / "crp-tiny_spurious_shapes.safetensors"


@pytest.fixture()
def attempt(run_cli, shapes_flags, tmp_path):
    def run(*model: str) -> tuple[int, str, Path]:
        cache = tmp_path / "cache"
        rc, _, err = run_cli(
            "eval", *shapes_flags, *model, "--quiet", "--num_workers", "0",
            "--feature_cache", cache, "--output", tmp_path / "out" / "r.json",
        )
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert rc == 2, err
        assert len(lines) == 1, lines
        assert not cache.exists() or not any(cache.iterdir())
        assert not (tmp_path / "out").exists()
        return rc, lines[0], cache

    return run


def test_a_misspelt_pretrained_tag_lists_the_real_tags_and_the_close_match(attempt):
    _, line, _ = attempt("--model", "crp-tiny", "--pretrained", "spurious_shape")
    assert "--pretrained spurious_shape" in line
    assert "spurious_shapes" in line and "spurious_quadrants" in line  # the registered tags of crp-tiny
    assert "did you mean 'spurious_shapes'?" in line


def test_an_open_clip_model_lists_open_clip_s_own_tags(attempt):
    import open_clip

    _, line, _ = attempt("--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79")
    for tag in open_clip.list_pretrained_tags_by_model("ViT-B-32"):
        assert tag in line
    assert "did you mean 'laion2b_s34b_b79k'?" in line


def test_a_model_open_clip_does_not_know(attempt):
    _, line, _ = attempt("--model", "crp-tinyy", "--pretrained", "spurious_shapes")
    assert "--model crp-tinyy: open_clip has no such model" in line and "crp-tiny" in line


def test_a_missing_checkpoint_file(attempt, tmp_path):
    _, line, _ = attempt("--model", "crp-tiny", "--pretrained", str(tmp_path / "nope.safetensors"))
    assert "nope.safetensors: no such file" in line


def test_a_checkpoint_with_a_mis_shaped_tensor_names_the_file_and_key(attempt, tmp_path):
    tensors = load_file(str(TINY_FILE))
    tensors["ln_final.bias"] = torch.zeros(3)
    broken = tmp_path / "reshaped.safetensors"
    save_file(tensors, str(broken))
    _, line, _ = attempt("--model", "crp-tiny", "--pretrained", str(broken))
    assert str(broken) in line and "does not fit --model crp-tiny" in line and "'ln_final.bias'" in line


def test_a_checkpoint_with_a_missing_key_names_it(attempt, tmp_path):
    tensors = load_file(str(TINY_FILE))
    del tensors["ln_final.weight"]
    broken = tmp_path / "missing.safetensors"
    save_file(tensors, str(broken))
    _, line, _ = attempt("--model", "crp-tiny", "--pretrained", str(broken))
    assert str(broken) in line and "missing key 'ln_final.weight'" in line


def test_a_checkpoint_of_another_architecture(attempt):
    _, line, _ = attempt("--model", "ViT-S-32", "--pretrained", str(TINY_FILE))
    assert str(TINY_FILE) in line and "does not fit --model ViT-S-32" in line and "key '" in line


def test_first_mismatch_reads_torch_s_message():
    torch_message = ('Error(s) in loading state_dict for CLIP:\n\tMissing key(s) in state_dict: "a.b", "c". \n\t'
                     'size mismatch for d: copying a param with shape torch.Size([3]) from checkpoint.')
    assert first_mismatch(torch_message) == "missing key 'a.b'"
    assert first_mismatch("Error(s) in loading state_dict for CLIP:\n\tsize mismatch for d: copying x.") == \
        "key 'd': copying x"
