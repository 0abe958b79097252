"""SEraser's views: ``auto`` resolution from the split's annotations before any work, the
``authors`` RandAugment views, and runs on datasets without masks (Waterbirds format, shards)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clip_robust_plugins.datasets.base import RobustDataset, SampleImage
from clip_robust_plugins.datasets.spurious_shapes import TEMPLATES, ShapesConfig, iter_split, schema_for
from clip_robust_plugins.datasets.wds import GroupedShards, write_grouped_dataset
from clip_robust_plugins.mitigations.seraser import AuthorsViews, ViewOptions, resolve_views, split_annotations
from fixture_formats import write_waterbirds

TINY = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--num_workers", "0", "--no_amp"]
QUICK = ["--seraser_steps", "2", "--seraser_lr", "1e-2"]


def shards(root, *, masks: bool, boxes: bool) -> GroupedShards:
    """Small spurious_shapes shards with or without masks and boxes."""
    config = ShapesConfig(train_size=8, val_size=8, test_size=8)

    def items(split):
        for key, image, values, extra, mask in iter_split(config, split):
            yield key, image, values, (extra if boxes else {}), (mask if masks else None)

    write_grouped_dataset(root, schema_for(config), TEMPLATES, {split: items(split) for split in ("train", "test")})
    return GroupedShards(root)


def test_annotations_of_grouped_shards_come_from_the_tar_headers_and_json(tmp_path, shapes_root):
    assert split_annotations(GroupedShards(shapes_root), "test") == {"mask": True, "box": True}
    boxed = shards(tmp_path / "boxes", masks=False, boxes=True)
    assert split_annotations(boxed, "test") == {"mask": False, "box": True}
    bare = shards(tmp_path / "bare", masks=False, boxes=False)
    assert split_annotations(bare, "test") == {"mask": False, "box": False}
    assert resolve_views("auto", GroupedShards(shapes_root), "robust/spurious_shapes", "test").name == "masks"
    assert resolve_views("auto", boxed, "wds/boxes", "test").name == "boxes"
    assert resolve_views("auto", bare, "wds/bare", "test").name == "augment"
    assert resolve_views("augment", bare, "wds/bare", "test").name == "augment"
    with pytest.raises(ValueError, match=r"^wds/bare split 'test' has no foreground masks .*--seraser_views masks"):
        resolve_views("masks", bare, "wds/bare", "test")
    with pytest.raises(ValueError, match=r"^wds/bare split 'test' has no object boxes"):
        resolve_views("boxes", bare, "wds/bare", "test")


def test_a_dataset_may_declare_its_annotations_and_unknown_ones_are_not_refused():
    class Declares:
        def sample_annotations(self, split):
            return {"mask": split == "test"}

    assert resolve_views("auto", Declares(), "x", "test").name == "masks"
    assert resolve_views("auto", Declares(), "x", "val").name == "augment"
    assert resolve_views("boxes", Declares(), "x", "test").reason.startswith("requested (the dataset does not declare")
    with pytest.raises(ValueError, match="no foreground masks"):
        resolve_views("masks", Declares(), "x", "val")
    class Silent:  # the base class default: unknown
        sample_annotations = RobustDataset.sample_annotations

    assert resolve_views("masks", Silent(), "x", "test").name == "masks"  # unknown: runs, fails per sample if need be


def _sample(key: str = "k0") -> SampleImage:
    _, image, values, extra, mask = next(iter(iter_split(ShapesConfig(train_size=8, val_size=8, test_size=8), "test")))
    return SampleImage(key, image, {**values, **extra}, mask)


def test_authors_views_are_randaugment_seeded_per_sample_and_leave_the_global_rng_alone():
    provider = AuthorsViews(ViewOptions(), seed=0)
    assert (provider.n_foreground, provider.n_background) == (1, 16)  # raw | raw + 15 RandAugment(2) views
    assert "num_ops=2" in provider.config and "n_aug=15" in provider.config and "seed=0" in provider.config
    torch.manual_seed(123)
    state = torch.get_rng_state()
    views = provider(_sample())
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is where it was
    raw = _sample().image.tobytes()
    assert views.foreground[0].tobytes() == raw == views.background[0].tobytes()
    assert len({v.tobytes() for v in views.background[1:]}) > 10 and views.background[1].size == _sample().image.size
    again = AuthorsViews(ViewOptions(), seed=0)(_sample())  # the same sample alone, after other draws
    torch.rand(5)
    assert [v.tobytes() for v in again.background] == [v.tobytes() for v in views.background]
    other_key = provider(_sample("k1"))
    other_seed = AuthorsViews(ViewOptions(), seed=1)(_sample())
    assert [v.tobytes() for v in other_key.background] != [v.tobytes() for v in views.background]
    assert [v.tobytes() for v in other_seed.background] != [v.tobytes() for v in views.background]
    assert AuthorsViews(ViewOptions(n_aug=3)).n_background == 4


def test_authors_views_survive_pickling_for_dataloader_workers():
    import pickle

    provider = AuthorsViews(ViewOptions(), seed=0)
    first = provider(_sample())
    clone = pickle.loads(pickle.dumps(provider))
    assert [v.tobytes() for v in clone(_sample()).background] == [v.tobytes() for v in first.background]


def test_waterbirds_folder_without_masks_runs_with_no_extra_flag(run_cli, tmp_path):
    write_waterbirds(tmp_path / "wb")
    out = tmp_path / "res.json"
    rc, _, err = run_cli("eval", "--dataset", "robust/waterbirds", "--dataset_root", tmp_path / "wb", *TINY,
                         "--mitigation", "seraser", *QUICK, "--feature_cache", tmp_path / "cache", "--output", out)
    assert rc == 0, err
    hp = json.loads(out.read_text())["robust"]["methods"]["seraser"]["hyperparameters"]
    assert hp["views"] == "auto" and hp["view_provider"] == "augment"
    assert hp["view_provider_reason"].startswith("auto: split 'test' has no masks or boxes")
    assert hp["view_provider_config"].startswith("augment:") and hp["n_images"] == 10


def test_masks_where_there_are_none_fail_before_the_model_or_any_feature(run_cli, tmp_path):
    write_waterbirds(tmp_path / "wb")
    out, cache = tmp_path / "res.json", tmp_path / "cache"
    # a checkpoint file that cannot load (its existence is checked up front, its contents when the
    # model is built): seraser's error must come before anything tries to build the model
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    rc, _, err = run_cli("eval", "--dataset", "robust/waterbirds", "--dataset_root", tmp_path / "wb",
                         "--model", "crp-tiny", "--pretrained", tmp_path / "broken.safetensors", "--num_workers", "0",
                         "--mitigation", "seraser", "--seraser_views", "masks", "--feature_cache", cache, "--output", out)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and not out.exists() and not (cache.exists() and any(cache.rglob("*")))
    assert "mitigation 'seraser'" in line and "failed in check" in line
    assert "robust/waterbirds split 'test' has no foreground masks" in line
    assert "--seraser_views masks" in line and "broken.safetensors" not in line


def test_boxes_only_shards_resolve_to_boxes_end_to_end(run_cli, tmp_path):
    shards(tmp_path / "boxes", masks=False, boxes=True)
    out = tmp_path / "res.json"
    rc, _, err = run_cli("eval", "--dataset", "wds/boxes", "--dataset_root", tmp_path / "boxes", *TINY,
                         "--mitigation", "seraser", *QUICK, "--feature_cache", tmp_path / "cache", "--output", out)
    assert rc == 0, err
    hp = json.loads(out.read_text())["robust"]["methods"]["seraser"]["hyperparameters"]
    assert hp["view_provider"] == "boxes" and np.isfinite(hp["loss_last_step_mean"])


def test_flags_come_from_the_config_dataclasses(crp_plugin_manager):
    import argparse

    from clip_robust_plugins.argtypes import spec_config
    from clip_robust_plugins.mitigations import seraser
    from clip_robust_plugins.plugins import add_spec_flags

    registry = crp_plugin_manager.registry
    spec, masks = registry.mitigation("seraser"), registry.view_provider("masks")
    assert (spec.options, spec.option_prefix) == (seraser.SEraserConfig, "seraser_")
    assert (masks.options, masks.option_prefix, masks.takes_seed) == (seraser.ViewOptions, "seraser_", True)
    parser = argparse.ArgumentParser()
    add_spec_flags(parser, registry, kinds=("mitigations", "view_providers"),
                   only=lambda kind, name: registry.owner(kind, name) == "clip_robust_plugins.mitigations.seraser")
    defaults = spec_config(spec, parser.parse_args([]))
    assert defaults == seraser.SEraserConfig() and defaults.views == "auto" and defaults.logit_scale == 100.0
    args = parser.parse_args(["--seraser_logit_scale", "model", "--no-seraser_black_view", "--seraser_views", "authors",
                              "--seraser_randaugment_ops", "3"])
    config = spec_config(spec, args)
    assert config.logit_scale == "model" and config.black_view is False and config.views == "authors"
    # the providers' settings: the method's nested ones are the same flags, read by each provider's own record
    assert spec_config(masks, args) == config.view_settings == seraser.ViewOptions(randaugment_ops=3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--seraser_logit_scale", "-1"])
