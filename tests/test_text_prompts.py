"""Prompt building, the prompt file reader and the cached text encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_robust_plugins.features import FeatureCache
from clip_robust_plugins.groups import two_field_schema
from clip_robust_plugins.mitigations.text import encode
from clip_robust_plugins.mitigations.text.orth_cali import pair_indices
from clip_robust_plugins.mitigations.text.prompts import PromptConfig, PromptError, build_prompts

SCHEMA = two_field_schema(["square", "diamond"], ["land", "open_water"])


def test_defaults_from_names_and_templates():
    p = build_prompts(PromptConfig(), SCHEMA.classnames, ["a {c}.", "an {c}!"], SCHEMA)
    assert p.group[1][1] == ("a diamond on a open water background.", "an diamond on a open water background!")
    assert p.spurious[1] == ("a photo with a open water background.", "a photo of open water.")
    assert p.reject == (("a photo with a land background.", "a photo with a open water background."),
                        ("a photo of land.", "a photo of open water."))
    flat, pairs = pair_indices(p)
    assert [(flat[i], flat[j]) for i, j in pairs][0] == ("a square on a land background.",
                                                         "a square on a open water background.")
    assert len(pairs) == 4


def test_prompt_file_sections(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# mine\n[spurious: land]\nground\n[spurious: open_water]\nsea\n"
                 "[accept]\na square | a diamond\n")
    p = build_prompts(PromptConfig(prompt_file=str(f)), SCHEMA.classnames, ["{c}"], SCHEMA)
    assert p.spurious == (("ground",), ("sea",)) and p.accept == (("a square", "a diamond"),)
    assert p.source == str(f)


@pytest.mark.parametrize("text, where", [
    ("[group: circle | land]\nx\n", "line 1"),
    ("hello\n", "line 1"),
    ("[reject]\nonly one side\n", "line 2"),
    ("[spurious: land]\nground\n", "no [spurious: open_water]"),
    ("[bogus]\n", "line 1"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, text, where):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(PromptError, match=f"bad.txt: .*{where}" if "line" in where else f"bad.txt: {where}".replace("[", r"\[")):
        build_prompts(PromptConfig(prompt_file=str(f)), SCHEMA.classnames, ["{c}"], SCHEMA)


def test_bad_phrase_is_one_line_error():
    with pytest.raises(PromptError, match="group phrase"):
        build_prompts(PromptConfig(group_phrase="{c} {x.__class__}"), SCHEMA.classnames, ["{c}"], SCHEMA)


def test_encoder_caches_on_disk_and_in_memory(tmp_path):
    from clip_robust_plugins.features.extractor import FeatureExtractor

    table = {"a": [1.0, 0.0], "b": [0.0, 2.0]}
    calls = []

    class Model(torch.nn.Module):
        def encode_text(self, tokens):
            calls.append(len(tokens))
            return tokens

    def tokenizer(texts):
        return torch.tensor([table[t] for t in texts])

    class Ctx:  # weak-referenceable, like RunContext
        pass

    def make_ctx():
        ext = FeatureExtractor(model=Model(), transform=lambda x: x, model_type="open_clip", model_name="m",
                               pretrained="p", device="cpu", amp=False, cache=FeatureCache(tmp_path))
        ctx = Ctx()
        ctx.__dict__.update(extractor=ext, model=Model(), tokenizer=tokenizer, device="cpu", amp=False)
        return ctx

    ctx = make_ctx()
    raw = encode.encode_texts(ctx, ["b", "a", "b"], normalize=False)
    assert np.allclose(raw.numpy(), [[0, 2], [1, 0], [0, 2]])
    assert np.allclose(encode.encode_texts(ctx, ["b"]).numpy(), [[0, 1]])
    assert calls == [2]
    encode.encode_texts(make_ctx(), ["b", "a"])  # a new run reads the disk cache
    assert calls == [2]
