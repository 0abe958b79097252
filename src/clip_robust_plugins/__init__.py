"""clip-robust-plugins: group-robustness evaluation and mitigations for clip_benchmark.

Everything a plugin author needs is importable from here, and only from here (see
``docs/plugins.md`` for what is public).  Names are resolved on first use, so
``import clip_robust_plugins`` stays cheap and registering a plugin imports no torch.
"""

from __future__ import annotations

from .lazy import lazy_getattr

__version__ = "0.2.0"

#: public name -> module (relative to this package) that defines it
_PUBLIC: dict[str, str] = {
    # hooks
    "hookimpl": "hookspecs",
    # records handed to the register_* hooks
    "CheckpointSpec": "specs",
    "CommandContext": "specs",
    "CommandSpec": "specs",
    "DatasetRequest": "specs",
    "DatasetSpec": "specs",
    "MetricSpec": "specs",
    "MitigationSpec": "specs",
    "ModelLoaderSpec": "specs",
    "Needs": "specs",
    "Predictions": "specs",
    "RegionProposerSpec": "specs",
    "SampleViews": "specs",
    "ViewProviderSpec": "specs",
    "Box": "specs",
    # mitigations
    "Mitigation": "mitigations.base",
    "RunContext": "mitigations.base",
    "LinearHead": "mitigations.linear_head",
    "MethodContext": "mitigations.base",
    "AdaptedCLIP": "mitigations.adapted",
    # datasets and groups
    "RobustDataset": "datasets.base",
    "SampleImage": "datasets.base",
    "DatasetError": "datasets.base",
    "PluginError": "errors",
    "GroupedShards": "datasets.wds",
    "write_grouped_dataset": "datasets.wds",
    # the dataset-reader kit (also importable as clip_robust_plugins.readers)
    "FileDataset": "readers",
    "FileRow": "readers",
    "SkippedSample": "readers",
    "read_csv": "readers",
    "read_text": "readers",
    "parse_int": "readers",
    "split_name": "readers",
    "key_from_path": "readers",
    "resolve_under": "readers",
    "require_dir": "readers",
    "subfolders": "readers",
    "list_images": "readers",
    "open_image": "readers",
    "open_generated": "readers",
    "generator_metadata": "readers",
    "reader_config": "readers",
    "GroupSchema": "groups",
    "GroupSchemaError": "groups",
    "two_field_schema": "groups",
    # features a mitigation reads
    "FeatureSet": "features",
    "ImageSetKind": "features",
    # intervals on the run's shared, seeded resamples (for a metric's own bootstrap)
    "Resampler": "intervals",
    "percentile_interval": "intervals",
    "IntervalConfig": "intervals",
    # flags: one dataclass for a plugin's flags and config
    "option": "argtypes",
    "nested": "argtypes",
    "add_config_flags": "argtypes",
    "config_from_options": "argtypes",
}

__all__ = sorted([*_PUBLIC, "__version__"])


__getattr__ = lazy_getattr(__name__, _PUBLIC, globals())


def __dir__() -> list[str]:
    return __all__

