"""The pretraining corpus's attribute distribution, with its planted co-occurrences.

Attributes are drawn independently and uniformly, except for the configured skews:
``scene_bias`` entries ``(shape, scene, p)`` put a fraction ``p`` of that shape's images
on that scene (the rest uniform over the others), and ``marker_shape`` carries the
marker with probability ``marker_with_shape`` while every other shape carries it with
``marker_otherwise``.  That is where the pretrained model's spurious correlations come
from, as web captions give CLIP its shortcuts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .vocab import ATTRIBUTES, SCENES, SHAPES


@dataclass(frozen=True)
class PretrainConfig:
    scene_bias: tuple[tuple[str, str, float], ...] = (("hexagon", "water", 0.75), ("circle", "grass", 0.75))
    marker_shape: str = "star"
    marker_with_shape: float = 0.8
    marker_otherwise: float = 0.05

    def __post_init__(self) -> None:
        for shape, scene, p in self.scene_bias:
            if shape not in SHAPES or scene not in SCENES or not 0.0 <= p <= 1.0:
                raise ValueError(f"bad scene_bias entry {(shape, scene, p)!r}")
        if self.marker_shape not in SHAPES:
            raise ValueError(f"unknown marker_shape {self.marker_shape!r}")


def sample_attributes(rng: np.random.Generator, n: int, config: PretrainConfig) -> dict[str, np.ndarray]:
    """``n`` attribute draws as value indices, one int array per attribute of :data:`ATTRIBUTES`."""
    out = {name: rng.integers(len(values), size=n) for name, values in ATTRIBUTES.items()}
    shape, scene = out["shape"], out["scene"]
    for s_name, sc_name, p in config.scene_bias:
        s, sc = SHAPES.index(s_name), SCENES.index(sc_name)
        rows = np.flatnonzero(shape == s)
        own = rng.random(len(rows)) < p
        others = np.array([k for k in range(len(SCENES)) if k != sc])
        scene[rows] = np.where(own, sc, others[rng.integers(len(others), size=len(rows))])
    p_marker = np.where(shape == SHAPES.index(config.marker_shape), config.marker_with_shape, config.marker_otherwise)
    out["marker"] = (rng.random(n) < p_marker).astype(np.int64)
    return out


def attribute_names(draws: dict[str, np.ndarray], i: int) -> dict[str, str]:
    """The value names of draw ``i``."""
    return {name: ATTRIBUTES[name][int(draws[name][i])] for name in ATTRIBUTES}
