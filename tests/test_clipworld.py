"""robust/clipworld: rendering, captions, the pretraining skews, the tasks and their files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from clip_robust_plugins.argtypes import config_from_options
from clip_robust_plugins.datasets.base import DatasetError
from clip_robust_plugins.datasets.clipworld.captions import caption
from clip_robust_plugins.datasets.clipworld.plugin import load_clipworld, task_root
from clip_robust_plugins.datasets.clipworld.pretrain import PretrainConfig, sample_attributes
from clip_robust_plugins.datasets.clipworld.render import render, shape_mask
from clip_robust_plugins.datasets.clipworld.tasks import PRESETS, WorldTaskConfig, iter_split, resolve
from clip_robust_plugins.datasets.clipworld.vocab import ATTRIBUTES, SCENES, SHAPES
from clip_robust_plugins.specs import DatasetRequest

SMALL = dict(world_train_size=40, world_val_size=8, world_test_size=8)


def _flags(**given) -> argparse.Namespace:
    """Parsed --world_* flags as eval gives them: every declared flag present, None unless given."""
    import dataclasses

    return argparse.Namespace(**{**{f"world_{f.name}": None for f in dataclasses.fields(WorldTaskConfig)}, **given})


def _request(root, **flags) -> DatasetRequest:
    ns = _flags(**flags)
    return DatasetRequest(root=str(root), options=ns, config=config_from_options(WorldTaskConfig, "world_", ns))


def test_shapes_differ_and_fill_their_extent():
    masks = {s: shape_mask(s, 24.0, 24.0, 14.0, 48, 0.0) for s in SHAPES}
    for s, m in masks.items():
        assert 80 < m.sum() < 700, s  # drawn, and inside its circumradius disc (pi * 14^2 = 616)
    names = list(masks)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert (masks[names[i]] != masks[names[j]]).sum() > 20, (names[i], names[j])
    ring = masks["ring"]
    assert not ring[24, 24] and masks["circle"][24, 24]  # the ring's hole


def test_render_geometry_and_marker_quadrant():
    rng = np.random.default_rng(0)
    attrs = dict(shape="star", colour="red", scene="sand", size="large", position="left", marker="marker")
    pixels, mask, extra = render(rng, attrs, 48)
    assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8
    x0, y0, x1, y1 = extra["box"]
    rows, cols = np.nonzero(mask)
    assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    q = extra["spurious_quadrant"]
    assert q >= 0 and q != extra["object_quadrant"]
    bx0, by0, bx1, by1 = extra["spurious_box"]
    qx0, qy0, qx1, qy1 = extra["regions"][q]
    assert qx0 <= bx0 < bx1 <= qx1 + 1 and qy0 <= by0 < by1 <= qy1 + 1
    patch = pixels[by0:by1, bx0:bx1].reshape(-1, 3).mean(0)
    assert patch[2] > 180 and patch[0] < 90  # cyan


def test_captions_name_the_attributes_they_use():
    rng = np.random.default_rng(0)
    attrs = dict(shape="hexagon", colour="pink", scene="snow", size="small", position="right", marker="no_marker")
    caps = [caption(rng, attrs) for _ in range(300)]
    words = {w.strip(".") for c in caps for w in c.split()}
    assert {"hexagon", "pink", "snow", "small", "right"} <= words
    others = {v for vals in ATTRIBUTES.values() for v in vals} - set(attrs.values()) - {"center"}
    assert not words & others
    assert any("hexagon" not in c for c in caps) and any("snow" not in c for c in caps)


def test_pretraining_skews_hold():
    rng = np.random.default_rng(1)
    draws = sample_attributes(rng, 40000, PretrainConfig())
    hexagon = draws["shape"] == SHAPES.index("hexagon")
    (shape, scene, p), _ = PretrainConfig().scene_bias
    assert (shape, scene) == ("hexagon", "water") and 0.5 <= p <= 1.0
    assert abs((draws["scene"][hexagon] == SCENES.index("water")).mean() - p) < 0.02
    square = draws["shape"] == SHAPES.index("square")
    assert abs((draws["scene"][square] == SCENES.index("water")).mean() - 1 / 6) < 0.03
    circle = draws["shape"] == SHAPES.index("circle")
    assert abs((draws["scene"][circle] == SCENES.index("water")).mean() - (1 - p) / 5) < 0.02
    star = draws["shape"] == SHAPES.index("star")
    assert abs(draws["marker"][star].mean() - 0.8) < 0.03 and draws["marker"][~star].mean() < 0.07


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_counts_and_values(preset):
    config = resolve(WorldTaskConfig(preset=preset), argparse.Namespace())
    for k, v in PRESETS[preset].items():
        assert getattr(config, k) == v
    samples = list(iter_split(config, "train"))
    assert len(samples) == config.train_size
    y = np.array([s[2]["y"] for s in samples])
    a = np.array([s[2]["a"] for s in samples])
    counts = np.bincount(y * 2 + a, minlength=4)
    assert counts.tolist() == config.group_counts("train").tolist()
    for _key, _image, values, extra, _mask in samples[:50]:
        attrs = extra["attributes"]
        assert attrs[config.class_field] == config.class_values[values["y"]]
        assert attrs[config.spurious_field] == config.spurious_values[values["a"]]


def test_flags_override_the_preset():
    ns = _flags(world_preset="patch", world_correlation=0.7)
    config = resolve(config_from_options(WorldTaskConfig, "world_", ns), ns)
    assert config.correlation == 0.7 and config.spurious_field == "marker"


def test_loader_writes_groups_json_naming_every_value(tmp_path):
    ds = load_clipworld(_request(tmp_path, world_preset="patch", **SMALL))
    assert ds.classnames == ["hexagon", "circle"]
    (root,) = [p for p in tmp_path.iterdir()]
    meta = json.loads((root / "groups.json").read_text())
    assert meta["world"]["attributes"] == {k: list(v) for k, v in ATTRIBUTES.items()}
    assert [f["values"] for f in meta["fields"]] == [["hexagon", "circle"], ["no_marker", "marker"]]
    assert meta["world"]["spurious_field"] == "marker"
    again = load_clipworld(_request(tmp_path, world_preset="patch", **SMALL))  # reuses the generated files
    assert again.classnames == ds.classnames and len(list(tmp_path.iterdir())) == 1


def test_presets_live_side_by_side(tmp_path):
    a = task_root(str(tmp_path), resolve(WorldTaskConfig(preset="patch"), argparse.Namespace()))
    b = task_root(str(tmp_path), resolve(WorldTaskConfig(preset="waterbirds_like"), argparse.Namespace()))
    assert a != b and a.parent == b.parent == tmp_path


@pytest.mark.parametrize("flags, message", [
    (dict(world_class_values=("hexagon", "water")), "class_values"),
    (dict(world_preset="patch", world_class_field="colour"), "class_values"),
    (dict(world_spurious_field="shape"), "both"),
])
def test_bad_task_flags_name_the_flag(tmp_path, flags, message):
    with pytest.raises(DatasetError, match=message):
        load_clipworld(_request(tmp_path, **flags, **SMALL))
    assert not any(tmp_path.iterdir())
