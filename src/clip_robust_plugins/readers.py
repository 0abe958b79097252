"""The dataset-reader kit: everything a reader of a published dataset needs, public and stable.

The built-in readers (``robust/waterbirds``, ``robust/spawrious``, ...) use only this module
and the package root, as a third-party reader would; ``docs/datasets.md`` ("Write a reader")
shows a complete CSV reader.  In short:

- parse the dataset's own metadata into :class:`FileRow` records (``read_csv``,
  ``parse_int``, ``split_name``, ``key_from_path``, ``resolve_under``, or the folder
  helpers ``require_dir``, ``subfolders``, ``list_images``), and return a
  :class:`FileDataset`: it sorts rows, checks keys and values, counts groups, decodes
  images (a file that does not decode becomes a :class:`SkippedSample`, the skip
  protocol: an error naming the file, or skipped under ``--skip_bad_samples``) and
  fingerprints the files for the feature cache;
- a procedurally generated dataset writes grouped shards once (``write_grouped_dataset``
  with ``generator_metadata``) and opens them with :func:`open_generated`, which refuses a
  root made by another generator, version or config;
- a reader's settings are one frozen dataclass of ``option`` fields declared with
  ``DatasetSpec(options=..., option_prefix=...)``; ``reader_config(request, Config)``
  returns the parsed instance (the defaults when the reader is called directly).
"""

from __future__ import annotations

from typing import Any, TypeVar

from .datasets.bad_samples import SkippedSample
from .datasets.base import DatasetError, RobustDataset, SampleImage, apply_transform
from .datasets.files import (
    SPLIT_CODES,
    SPLIT_ORDER,
    FileDataset,
    FileRow,
    key_from_path,
    open_image,
    parse_int,
    read_csv,
    read_text,
    resolve_under,
    split_name,
)
from .datasets.folders import IMAGE_SUFFIXES, list_images, require_dir, subfolders
from .datasets.generated import config_json, generator_metadata, open_generated, progress_bars

__all__ = [
    "DatasetError", "FileDataset", "FileRow", "IMAGE_SUFFIXES", "RobustDataset", "SPLIT_CODES", "SPLIT_ORDER",
    "SampleImage", "SkippedSample", "apply_transform", "config_json", "generator_metadata", "key_from_path",
    "list_images", "open_generated", "open_image", "parse_int", "progress_bars", "read_csv", "read_text", "reader_config",
    "require_dir", "resolve_under", "split_name", "subfolders",
]

C = TypeVar("C")


def reader_config(request: Any, config_cls: type[C]) -> C:
    """The reader's typed config: ``request.config`` as the CLI parsed it, or the defaults when
    a reader is called without one (tests, other programs); another type is a one-line error."""
    config = getattr(request, "config", None)
    if config is None:
        return config_cls()
    if not isinstance(config, config_cls):
        raise DatasetError(f"a {config_cls.__name__} was expected as the reader's config, got {type(config).__name__}")
    return config
