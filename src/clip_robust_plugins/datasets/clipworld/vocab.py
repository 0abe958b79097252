"""The world's attribute values: every word a caption or a prompt can use (index = value)."""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
COLOURS = ("red", "yellow", "purple", "orange", "black", "white", "green", "pink")
SCENES = ("water", "grass", "sand", "snow", "bricks", "sky")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
MARKERS = ("no_marker", "marker")
#: the marker's caption word ("a star with a cyan patch")
MARKER_WORD = "cyan patch"

#: every attribute of a rendered sample and its value names
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": COLOURS,
    "scene": SCENES,
    "size": SIZES,
    "position": POSITIONS,
    "marker": MARKERS,
}

#: object colours (RGB 0..255)
COLOUR_RGB = {
    "red": (220, 40, 40),
    "yellow": (240, 220, 50),
    "purple": (130, 50, 190),
    "orange": (245, 140, 30),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "green": (40, 170, 60),
    "pink": (245, 140, 190),
}
MARKER_RGB = (30, 220, 230)

#: zero-shot templates per field kind: an object field reads "a photo of a star.", a scene "a photo of sand."
OBJECT_TEMPLATES = ("a photo of a {c}.", "a picture of a {c}.", "an image of a {c}.", "a {c}.")
SCENE_TEMPLATES = ("a photo of {c}.", "a picture of {c}.", "an image of {c}.", "{c}.")
MARKER_TEMPLATES = ("a photo with {c}.", "a picture with {c}.", "an image with {c}.", "{c}.")


def templates_for(field: str) -> tuple[str, ...]:
    """The zero-shot templates for prompts naming values of ``field``."""
    if field == "scene":
        return SCENE_TEMPLATES
    if field == "marker":
        return MARKER_TEMPLATES
    return OBJECT_TEMPLATES


def prompt_name(field: str, value: str) -> str:
    """The words a prompt uses for ``value`` of ``field`` (the marker's values are not words)."""
    if field == "marker":
        return "a " + MARKER_WORD if value == "marker" else "no patch"
    return value
