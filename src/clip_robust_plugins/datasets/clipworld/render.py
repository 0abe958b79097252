"""Rendering one world image: a textured scene, an outlined object, an optional marker patch.

Pure numpy on a ``size`` x ``size`` grid; every random draw comes from the caller's
generator, so an image is a function of its attributes and the generator state.
"""

from __future__ import annotations

import math

import numpy as np

from .vocab import COLOUR_RGB, MARKER_RGB, POSITIONS, SCENES, SHAPES

#: object radius as a fraction of the image side, per size value (small, large)
RADIUS_RANGE = ((0.2, 0.26), (0.3, 0.38))
#: marker side as a fraction of the image side
MARKER_SIDE = 0.2
PIXEL_NOISE = 10.0


def quadrant_boxes(size: int) -> list[list[int]]:
    """Quadrant boxes [x0, y0, x1, y1] (x1/y1 exclusive): top-left, top-right, bottom-left, bottom-right."""
    h = size // 2
    return [[0, 0, h, h], [h, 0, size, h], [0, h, h, size], [h, h, size, size]]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)  # x (columns), y (rows)


def scene_texture(rng: np.random.Generator, scene: str, size: int) -> np.ndarray:
    """A (size, size, 3) float texture for ``scene``."""
    x, y = _grid(size)
    s = size / 48.0
    ph = rng.uniform(0, 2 * math.pi, 4)
    jitter = rng.normal(0.0, 8.0, 3)
    if scene == "water":
        wave = np.sin(y / (2.2 * s) + ph[0] + 1.5 * np.sin(x / (6 * s) + ph[1]))
        img = np.array([40.0, 90.0, 170.0]) + wave[..., None] * np.array([15.0, 25.0, 35.0])
    elif scene == "grass":
        blades = rng.normal(0.0, 1.0, (1, size)).repeat(size, 0) * 0.7 + rng.normal(0.0, 1.0, (size, size)) * 0.5
        img = np.array([60.0, 140.0, 50.0]) + blades[..., None] * np.array([15.0, 30.0, 12.0])
    elif scene == "sand":
        dune = np.sin((x + 0.6 * y) / (5 * s) + ph[0])
        img = np.array([215.0, 190.0, 130.0]) + dune[..., None] * 12.0 + rng.normal(0.0, 14.0, (size, size, 1))
    elif scene == "snow":
        blot = np.sin(x / (7 * s) + ph[0]) * np.sin(y / (5 * s) + ph[1])
        img = np.array([232.0, 236.0, 245.0]) - (blot[..., None] > 0.5) * np.array([35.0, 30.0, 15.0])
    elif scene == "bricks":
        h = max(3, round(6 * s))
        row = ((y + ph[0]) // h).astype(int)
        xs = x + (row % 2) * (1.5 * h) + ph[1]
        mortar = ((y + ph[0]) % h < 1.2) | (xs % (3 * h) < 1.2)
        img = np.where(mortar[..., None], np.array([200.0, 195.0, 185.0]), np.array([160.0, 60.0, 45.0]))
    elif scene == "sky":
        cloud = np.sin(x / (4 * s) + ph[0]) + np.sin(y / (3 * s) + ph[1]) + np.sin((x + y) / (6 * s) + ph[2])
        base = np.array([135.0, 190.0, 240.0]) + (y / size)[..., None] * np.array([-30.0, -25.0, 0.0])
        img = np.where((cloud > 1.6)[..., None], np.array([250.0, 250.0, 252.0]), base)
    else:
        raise ValueError(f"unknown scene {scene!r}; scenes are {', '.join(SCENES)}")
    return img + jitter


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int, angle: float) -> np.ndarray:
    """Boolean mask of a filled ``shape`` of circumradius ``radius`` centred at (cx, cy), turned by ``angle``."""
    x, y = _grid(size)
    ca, sa = math.cos(angle), math.sin(angle)
    u = ((x - cx) * ca + (y - cy) * sa) / radius
    v = (-(x - cx) * sa + (y - cy) * ca) / radius
    d = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return d <= 0.95
    if shape == "ring":
        return (d <= 1.0) & (d >= 0.55)
    if shape == "square":
        return np.maximum(au, av) <= 0.78
    if shape == "diamond":
        return au + av <= 1.05
    if shape == "triangle":  # apex up (v grows downwards on screen)
        return (v <= 0.55) & (v >= -1.0 + 1.75 * au)
    if shape == "star":
        theta = np.arctan2(v, u) + math.pi / 2
        r = 0.42 + 0.58 * ((1 + np.cos(5 * theta)) / 2) ** 2
        return d <= r
    if shape == "cross":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape == "hexagon":
        return (av <= 0.85) & (0.866 * au + 0.5 * av <= 0.85)
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


def mask_box(mask: np.ndarray) -> list[int]:
    """Tight pixel box [x0, y0, x1, y1] of a non-empty boolean mask (x1/y1 exclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _outline(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    for axis in (0, 1):
        for step in (1, -1):
            grown |= np.roll(mask, step, axis=axis)
    return grown & ~mask


def render(rng: np.random.Generator, attrs: dict[str, str], size: int,
           marker_quadrant: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One image (size, size, 3) uint8, its object mask and its geometry.

    ``attrs`` names ``shape``, ``colour``, ``scene``, ``size``, ``position`` and ``marker``
    values; the marker (when ``marker == "marker"``) goes into ``marker_quadrant`` or a
    random quadrant other than the one holding the object's centre.  Returns extra metadata: the object box, the quadrant boxes and the
    marker's quadrant (-1 without one) and box.
    """
    img = scene_texture(rng, attrs["scene"], size)
    radius = rng.uniform(*RADIUS_RANGE[attrs["size"] == "large"]) * size
    third = size / 3.0
    col = POSITIONS.index(attrs["position"])
    lo, hi = max(radius, col * third), min(size - radius, (col + 1) * third)
    cx = rng.uniform(lo, hi) if hi > lo else (lo + hi) / 2
    cy = rng.uniform(radius, size - radius)
    mask = shape_mask(attrs["shape"], cx, cy, radius, size, rng.uniform(-0.15, 0.15))
    colour = np.array(COLOUR_RGB[attrs["colour"]], dtype=np.float64) + rng.normal(0.0, 10.0, 3)
    img[_outline(mask)] *= 0.35
    img[mask] = colour
    boxes = quadrant_boxes(size)
    object_quadrant = 2 * int(cy >= size / 2) + int(cx >= size / 2)
    quadrant = -1
    if attrs["marker"] == "marker":
        if marker_quadrant is None:  # a quadrant other than the object's, as in RaVL's setting
            marker_quadrant = int(rng.choice([q for q in range(4) if q != object_quadrant]))
        quadrant = int(marker_quadrant)
        side = max(3, round(MARKER_SIDE * size))
        qx0, qy0, qx1, qy1 = boxes[quadrant]
        mx = int(rng.integers(qx0 + 1, max(qx0 + 2, qx1 - side)))
        my = int(rng.integers(qy0 + 1, max(qy0 + 2, qy1 - side)))
        img[my:my + side, mx:mx + side] = np.array(MARKER_RGB, dtype=np.float64)
        mask[my:my + side, mx:mx + side] = False
        marker_box = [mx, my, min(size, mx + side), min(size, my + side)]
    img += rng.normal(0.0, PIXEL_NOISE, img.shape)
    extra = {
        "box": mask_box(mask) if mask.any() else [0, 0, 0, 0],
        "regions": boxes,
        "object_quadrant": object_quadrant,
        "spurious_quadrant": quadrant,
        "spurious_box": marker_box if quadrant >= 0 else None,
    }
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, extra
