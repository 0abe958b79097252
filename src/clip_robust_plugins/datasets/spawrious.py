"""``robust/spawrious``: the Spawrious benchmarks (Lynch et al., 2023) from the released folders.

Built only with the public reader kit (``clip_robust_plugins``, ``clip_robust_plugins.readers``),
as a third-party reader would be; the layout, the six benchmarks and the deviations are in
``docs/datasets.md``.  The train/test class-location combinations restate
``spawrious/torch.py`` of github.com/aengusl/spawrious (``_get_combinations``,
``build_combination``); group = (class, location).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clip_robust_plugins import DatasetError, DatasetRequest, DatasetSpec, hookimpl, option, two_field_schema
from clip_robust_plugins.readers import FileDataset, FileRow, key_from_path, list_images, reader_config, require_dir

NAME = "spawrious"
#: the authors' class and location lists; their positions are the label codes
CLASSES = ("bulldog", "corgi", "dachshund", "labrador")
LOCATIONS = ("desert", "jungle", "dirt", "mountain", "snow", "beach")
RELEASE_DIR = "spawrious224"
TEMPLATES = ("a photo of a {c}.", "a photo of a {c}, a type of dog.")
#: benchmark -> (the four train locations, the four test locations, the o2o filler location),
#: each list in the order bulldog, dachshund, labrador, corgi as in the authors' code
BENCHMARKS = {
    "o2o_easy": (("desert", "jungle", "dirt", "snow"), ("dirt", "snow", "desert", "jungle"), "beach"),
    "o2o_medium": (("mountain", "beach", "dirt", "jungle"), ("jungle", "dirt", "beach", "snow"), "desert"),
    "o2o_hard": (("jungle", "mountain", "snow", "desert"), ("mountain", "snow", "desert", "jungle"), "beach"),
    "m2m_easy": (("desert", "mountain", "dirt", "jungle"), ("dirt", "jungle", "mountain", "desert"), None),
    "m2m_medium": (("beach", "snow", "mountain", "desert"), ("desert", "mountain", "beach", "snow"), None),
    "m2m_hard": (("dirt", "jungle", "snow", "beach"), ("snow", "beach", "dirt", "jungle"), None),
}
_ORDER = ("bulldog", "dachshund", "labrador", "corgi")
CITATION = "Lynch et al., Spawrious: A Benchmark for Fine Control of Spurious Correlation Biases, 2023"


@dataclass(frozen=True)
class SpawriousConfig:
    """``--spawrious_*`` flags."""

    benchmark: str = option("o2o_easy", "which of the six challenges", choices=tuple(BENCHMARKS))
    total: int = option(3168, "train images per class and environment before the o2o split (the authors' total)")

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise DatasetError(f"--spawrious_benchmark must be one of {list(BENCHMARKS)}, got {self.benchmark!r}")
        if self.total < 1:
            raise DatasetError(f"--spawrious_total must be at least 1, got {self.total}")


def combinations(benchmark: str, total: int) -> dict[str, list[tuple[str, int, str, int | None]]]:
    """``{split: [(class, env folder, location, image limit or None)]}`` as the authors build them."""
    train_locs, test_locs, filler = BENCHMARKS[benchmark]
    o2o = benchmark.startswith("o2o")
    cls = dict(zip(_ORDER, range(4)))  # class -> its position in the authors' lists
    out: dict[str, list[tuple[str, int, str, int | None]]] = {"train": [], "test": []}
    if o2o:
        limits = (int(0.97 * total), int(0.87 * total))
        for c, i in cls.items():
            out["train"] += [(c, env, train_locs[i], limits[env]) for env in (0, 1)]
            out["test"] += [(c, env, test_locs[i], None) for env in (0, 1)]
        out["train"] += [(c, env, filler, total - limits[env]) for c in _ORDER for env in (0, 1)]
    else:
        partner = {0: 1, 1: 0, 2: 3, 3: 2}  # bulldog<->dachshund, labrador<->corgi swap locations
        for c, i in cls.items():
            out["train"] += [(c, 0, train_locs[i], total), (c, 0, train_locs[partner[i]], total)]
            out["test"] += [(c, 0, test_locs[i], None), (c, 0, test_locs[partner[i]], None)]
    return out


def release_root(root: Path) -> Path:
    """The ``spawrious224`` folder: ``--dataset_root`` itself or the folder holding it."""
    inner = root / RELEASE_DIR
    return inner if inner.is_dir() else require_dir(root, f"robust/{NAME} ({RELEASE_DIR}/ with 0/ and 1/)")


def load_spawrious(request: DatasetRequest) -> FileDataset:
    config = reader_config(request, SpawriousConfig)
    base = release_root(Path(request.root))
    rows: dict[str, list[FileRow]] = {}
    for split, combos in combinations(config.benchmark, config.total).items():
        for cls, env, location, limit in combos:
            rel = f"{env}/{location}/{cls}"
            folder = require_dir(base / rel, f"robust/{NAME} {config.benchmark} {split} ({cls} in {location})")
            images = list_images(folder)[:limit]
            if not images:
                raise DatasetError(f"{folder}: no images ({config.benchmark} {split} needs {cls} in {location})")
            values = (CLASSES.index(cls), LOCATIONS.index(location))
            rows.setdefault(split, []).extend(
                FileRow(key_from_path(f"{rel}/{name}"), os.path.join(folder, name), values, {"env": env}, f"{folder} {name}")
                for name in images
            )
    return FileDataset(
        name=NAME, root=base, schema=two_field_schema(CLASSES, LOCATIONS, attribute_field="location"),
        classnames=CLASSES, templates=TEMPLATES, rows=rows,
        options={"benchmark": config.benchmark, "total": config.total},
    )


@hookimpl
def register_datasets(register) -> None:
    register(DatasetSpec(
        name=NAME, load=load_spawrious, citation=CITATION, options=SpawriousConfig, option_prefix="spawrious_",
        description="Spawrious o2o/m2m benchmarks from spawrious224/{0|1}/{location}/{class}/ (groups class x location)",
    ))
