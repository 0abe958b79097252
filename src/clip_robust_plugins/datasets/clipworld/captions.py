"""Compositional captions naming a random subset of a sample's attributes.

"a red star on sand", "a photo of a star", "grass with a small blue ring", "a photo of
snow", "a hexagon with a cyan patch": every attribute word appears in some captions and
is left out of others, so the text tower learns each word on its own and in context.
"""

from __future__ import annotations

import numpy as np

from .vocab import MARKER_WORD

_OBJECT_FRAMES = ("a photo of a {o}", "a picture of a {o}", "an image of a {o}", "a {o}", "a drawing of a {o}")
_SCENE_FRAMES = ("a photo of {s}", "a picture of {s}", "an image of {s}", "{s}")
_WITH_SCENE = ("{f} on {s}", "{s} with a {o}", "{f} in front of {s}")


def caption(rng: np.random.Generator, attrs: dict[str, str], p_shape: float = 0.85, p_scene: float = 0.6) -> str:
    """One caption for a sample with attribute value names ``attrs``.

    The shape is named with probability ``p_shape``, the scene with ``p_scene`` (and
    always when the shape is not).
    """
    return caption_and_fields(rng, attrs, p_shape, p_scene)[0]


def caption_and_fields(rng: np.random.Generator, attrs: dict[str, str], p_shape: float = 0.85,
                       p_scene: float = 0.6) -> tuple[str, tuple[str, ...]]:
    """:func:`caption` and the attributes it names: the caption is true of every image
    that shares those values, which is what a contrastive loss can count as a positive."""
    words, fields = [], []
    if rng.random() < 0.3:
        words.append(attrs["size"])
        fields.append("size")
    if rng.random() < 0.5:
        words.append(attrs["colour"])
        fields.append("colour")
    name_shape = rng.random() < p_shape
    name_scene = rng.random() < p_scene or not name_shape
    obj = " ".join([*words, attrs["shape"]]) if name_shape else None
    scene = attrs["scene"]
    if obj is None:
        text = _SCENE_FRAMES[rng.integers(len(_SCENE_FRAMES))].format(s=scene)
        fields = ["scene"]
    else:
        fields.append("shape")
        frame = _OBJECT_FRAMES[rng.integers(len(_OBJECT_FRAMES))].format(o=obj)
        if name_scene:
            text = _WITH_SCENE[rng.integers(len(_WITH_SCENE))].format(f=frame, s=scene, o=obj)
            fields.append("scene")
        else:
            text = frame
        if rng.random() < 0.15:
            text += " in the center" if attrs["position"] == "center" else f" on the {attrs['position']}"
            fields.append("position")
    if attrs["marker"] == "marker" and rng.random() < 0.6:
        text += f" with a {MARKER_WORD}"
        fields.append("marker")
    return text + ".", tuple(fields)
