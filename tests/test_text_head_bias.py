"""scripts/text_head_bias.py: a per-class offset learned from unlabelled train images, removed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file


def _split(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Two classes on axis 0, a shared offset on axis 1 (the image mean every image carries)."""
    labels = torch.arange(n) % 2
    features = torch.zeros(n, 4)
    features[:, 0] = (2 * labels - 1).float() * 0.1 + 0.02 * torch.randn(n, generator=gen)
    features[:, 1] = 1.0
    fields = torch.stack([labels, (torch.arange(n) // 2) % 2], 1)
    return {"features": features, "labels": labels, "fields": fields}


def test_offset_from_train_images_restores_a_shifted_head(tmp_path, load_script):
    gen = torch.Generator().manual_seed(0)
    train, test = _split(200, gen), _split(100, gen)
    save_file(train, str(tmp_path / "train.safetensors"))
    save_file(test, str(tmp_path / "test.safetensors"))
    # class 1's embedding leans on the shared axis: every image scores higher for class 1
    shifted = torch.tensor([[-1.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    save_file({"class_embeddings": shifted}, str(tmp_path / "state.safetensors"))
    save_file({"head": torch.tensor([[-1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])}, str(tmp_path / "head.safetensors"))
    module = load_script("text_head_bias")
    lines = module.report("shifted", module.class_embeddings(str(tmp_path / "state.safetensors")),
                          module.split(str(tmp_path / "train.safetensors")), module.split(str(tmp_path / "test.safetensors")))
    assert lines[-1] == "  worst group 0.000, offset removed 1.000"
    offsets = module.class_offsets(train["features"], module.class_embeddings(str(tmp_path / "state.safetensors")))
    assert offsets[1] > 0 > offsets[0] and torch.isclose(offsets.sum(), torch.tensor(0.0, dtype=torch.float64))
    # an unshifted head is left as it is
    plain = module.report("plain", module.class_embeddings(str(tmp_path / "head.safetensors")),
                          module.split(str(tmp_path / "train.safetensors")), module.split(str(tmp_path / "test.safetensors")))
    assert plain[-1] == "  worst group 1.000, offset removed 1.000"


def test_a_file_that_is_not_a_split_is_named(tmp_path, load_script):
    save_file({"head": torch.zeros(4, 2)}, str(tmp_path / "head.safetensors"))
    with pytest.raises(SystemExit, match="head.safetensors: not a cached image-feature split"):
        load_script("text_head_bias").main(["--train", str(tmp_path / "head.safetensors"), "--test", str(tmp_path / "head.safetensors"),
                        "--head", f"z={tmp_path / 'head.safetensors'}"])
