"""``robust/clipworld``: the world's group tasks as a dataset plugin (generated on first use)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...hookspecs import hookimpl
from ...specs import DatasetRequest, DatasetSpec
from ..base import RobustDataset
from .tasks import GENERATOR_VERSION, NAME, SPLITS, WorldTaskConfig, generate, resolve


def task_root(root: str, config: WorldTaskConfig) -> Path:
    """Where a task lives under ``--dataset_root``: one subdirectory per config, so presets coexist."""
    from ..generated import config_json

    digest = hashlib.sha256(json.dumps(config_json(config), sort_keys=True).encode()).hexdigest()[:10]
    return Path(root) / f"{NAME}-{config.preset}-{digest}"


def load_clipworld(request: DatasetRequest) -> RobustDataset:
    """Open (generating on first use) the requested task under ``request.root``."""
    from ..base import DatasetError
    from ..generated import open_generated
    from ..sources import is_remote_root

    if is_remote_root(str(request.root)):
        raise DatasetError(f"{request.root}: robust/{NAME} generates its data into a local directory; to read a "
                           f"served copy, use --dataset wds/{NAME} with this URL")
    try:
        config = resolve(request.config or WorldTaskConfig(), request.options)
    except ValueError as exc:
        raise DatasetError(f"{NAME}: {exc}") from None
    sub = DatasetRequest(root=str(task_root(request.root, config)), options=request.options, config=config)
    return open_generated(sub, name=NAME, version=GENERATOR_VERSION, config=config, flag_prefix="world_",
                          splits=SPLITS, generate=lambda root, cfg: generate(root, cfg, progress=True))


@hookimpl
def register_datasets(register) -> None:
    register(DatasetSpec(
        name=NAME,
        load=load_clipworld,
        description=("the procedural world of crp-world: a class attribute x a spurious attribute (shape, colour, "
                     "scene, size, position, marker), presets waterbirds_like / celeba_like / patch; masks, boxes "
                     "and quadrant region labels; generated under --dataset_root on first use"),
        citation="",
        options=WorldTaskConfig,
        option_prefix="world_",
    ))
