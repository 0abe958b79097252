"""Group tasks of the world: a class field x a spurious field, and the named presets.

A task picks two values of a *class* attribute (``y``) and two of a *spurious* one
(``a``); groups are ``g = y * 2 + a``.  In the train split a fraction ``correlation``
of each class carries "its" spurious value (class ``k`` with spurious value ``k``) and
``class_balance`` is the share of class 1; val and test are group-balanced, or (with
``eval_balanced`` off, CelebA's case) drawn like train.  Attributes that are not task
fields are uniform, except the marker, which is absent unless it is a task field.

Presets mirror the flagship benchmarks (:data:`PRESETS`); explicit ``--world_*`` flags
override a preset's values.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ...argtypes import option
from .render import render
from .vocab import ATTRIBUTES, prompt_name, templates_for

NAME = "clipworld"
SPLITS = ("train", "val", "test")
_SPLIT_INDEX = {split: i for i, split in enumerate(SPLITS)}
GENERATOR_VERSION = 2

#: the named tasks: field values that replace the config's defaults
PRESETS: dict[str, dict[str, Any]] = {
    # Waterbirds: two shapes x two scenes, 95% correlated train, balanced val/test; the
    # pair is the one skewed in pretraining (hexagons on water, circles on grass)
    "waterbirds_like": dict(class_field="shape", class_values=("hexagon", "circle"), spurious_field="scene",
                            spurious_values=("water", "grass"), correlation=0.95),
    # CelebA: an unbalanced class whose rarer value almost never shows the other spurious
    # value, in every split (the minority group is under 1% of the data)
    "celeba_like": dict(class_field="shape", class_values=("square", "triangle"), spurious_field="colour",
                        spurious_values=("yellow", "purple"), correlation=0.94, class_balance=0.15,
                        eval_balanced=False),
    # RaVL's synthetic setting: a small cyan marker in a quadrant other than the object's,
    # 95% with the circle in train, independent of the class in val/test; the class pair is
    # the one crp-world tells apart least well (zero-shot 0.86), so that a fine-tune on the
    # correlated train split has a reason to learn the marker (clipworld_patch_ft)
    "patch": dict(class_field="shape", class_values=("hexagon", "circle"), spurious_field="marker",
                  spurious_values=("no_marker", "marker"), correlation=0.95),
}


@dataclass(frozen=True)
class WorldTaskConfig:
    """Everything a task's data depends on (stored in ``groups.json``)."""

    preset: str = option("waterbirds_like", "named task whose values the other --world_* flags override",
                         choices=tuple(PRESETS))
    class_field: str = option("shape", "attribute holding the class y", choices=tuple(ATTRIBUTES))
    class_values: tuple[str, ...] = option(("hexagon", "circle"), "the two class values")
    spurious_field: str = option("scene", "attribute holding the spurious a", choices=tuple(ATTRIBUTES))
    spurious_values: tuple[str, ...] = option(("water", "grass"), "the two spurious values (class k goes with value k)")
    correlation: float = option(0.95, "train fraction of each class on its own spurious value")
    class_balance: float = option(0.5, "share of class 1 in train (and in val/test when not balanced)")
    eval_balanced: bool = option(True, "group-balanced val/test (else drawn like train)")
    train_size: int = option(2000, "number of train images")
    val_size: int = option(400, "number of val images")
    test_size: int = option(400, "number of test images")
    image_size: int = option(48, "image side in pixels")
    seed: int = option(0, "dataset-generation seed, separate from the run's --seed")

    def validate(self) -> None:
        """Raise ValueError naming the flag; called once the preset is applied (a preset's fields go together)."""
        if self.class_field == self.spurious_field:
            raise ValueError(f"--world_class_field and --world_spurious_field are both {self.class_field!r}")
        for flag, field, values in (("class_values", self.class_field, self.class_values),
                                    ("spurious_values", self.spurious_field, self.spurious_values)):
            known = ATTRIBUTES[field]
            if len(values) != 2 or len(set(values)) != 2 or any(v not in known for v in values):
                raise ValueError(f"--world_{flag} must be two different values of {field} ({', '.join(known)}), "
                                 f"got {' '.join(values)}")
        for flag, value in (("correlation", self.correlation), ("class_balance", self.class_balance)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--world_{flag} must be in [0, 1], got {value}")
        for flag, size in (("train_size", self.train_size), ("val_size", self.val_size), ("test_size", self.test_size)):
            if size < 4:
                raise ValueError(f"--world_{flag} must be at least 4, got {size}")
        if not 24 <= self.image_size <= 128:
            raise ValueError(f"--world_image_size must be in [24, 128], got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"--world_seed must be non-negative, got {self.seed}")

    def group_counts(self, split: str) -> np.ndarray:
        """Samples per group ``g = y * 2 + a`` for ``split``."""
        size = {"train": self.train_size, "val": self.val_size, "test": self.test_size}[split]
        if split != "train" and self.eval_balanced:
            return np.full(4, size // 4, dtype=np.int64)
        n1 = int(round(self.class_balance * size))
        counts = np.zeros(4, dtype=np.int64)
        for y, n_y in enumerate((size - n1, n1)):
            own = int(round(self.correlation * n_y))
            counts[y * 2 + y], counts[y * 2 + 1 - y] = own, n_y - own
        return counts

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(prompt_name(self.class_field, v) for v in self.class_values)

    @property
    def templates(self) -> tuple[str, ...]:
        return templates_for(self.class_field)


def resolve(config: WorldTaskConfig, options: Any) -> WorldTaskConfig:
    """``config`` with its preset's values for every field whose ``--world_<field>`` flag was not given, checked."""
    if config.preset not in PRESETS:
        raise ValueError(f"--world_preset must be one of {', '.join(PRESETS)}, got {config.preset!r}")
    preset = PRESETS[config.preset]
    chosen = {k: v for k, v in preset.items() if getattr(options, f"world_{k}", None) is None}
    resolved = dataclasses.replace(config, **chosen)
    resolved.validate()
    return resolved


def _sample_values(rng: np.random.Generator, config: WorldTaskConfig, y: int, a: int) -> dict[str, str]:
    values = {name: names[int(rng.integers(len(names)))] for name, names in ATTRIBUTES.items()}
    values["marker"] = "no_marker"
    values[config.class_field] = config.class_values[y]
    values[config.spurious_field] = config.spurious_values[a]
    return values


def iter_split(config: WorldTaskConfig, split: str) -> Iterator[tuple[str, Image.Image, dict[str, int], dict, Image.Image]]:
    """The samples of ``split`` as ``(key, image, values, extra, mask)``, deterministic in ``config``."""
    rng = np.random.default_rng([config.seed, _SPLIT_INDEX[split]])
    groups = np.repeat(np.arange(4), config.group_counts(split))
    groups = groups[rng.permutation(len(groups))]
    width = max(6, len(str(len(groups) - 1)))
    for i, g in enumerate(groups):
        y, a = divmod(int(g), 2)
        attrs = _sample_values(rng, config, y, a)
        pixels, mask, extra = render(rng, attrs, config.image_size)
        yield (
            f"world_{split}_{i:0{width}d}",
            Image.fromarray(pixels, mode="RGB"),
            {"y": y, "a": a},
            {**extra, "attributes": attrs},
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L"),
        )


def world_metadata(config: WorldTaskConfig) -> dict[str, Any]:
    """What groups.json says about the world: every attribute's values and the prompts' words."""
    return {"world": {
        "attributes": {name: list(values) for name, values in ATTRIBUTES.items()},
        "prompt_names": {name: {v: prompt_name(name, v) for v in values} for name, values in ATTRIBUTES.items()},
        "templates": {name: list(templates_for(name)) for name in ATTRIBUTES},
        "class_field": config.class_field, "class_values": list(config.class_values),
        "spurious_field": config.spurious_field, "spurious_values": list(config.spurious_values),
    }}


def generate(root: str | os.PathLike, config: WorldTaskConfig, progress: bool = True):
    """Write the task's grouped shards into ``root``."""
    from ...groups import two_field_schema
    from ..generated import generator_metadata, progress_bars
    from ..wds import write_grouped_dataset

    totals = {split: int(config.group_counts(split).sum()) for split in SPLITS}
    return write_grouped_dataset(
        root,
        two_field_schema(config.class_values, config.spurious_values),
        config.templates,
        {split: iter_split(config, split) for split in SPLITS},
        extra_metadata={**generator_metadata(NAME, GENERATOR_VERSION, config), **world_metadata(config)},
        progress=progress_bars(NAME, totals, progress),
        classnames=config.classnames,
    )
