"""clip-robust-plugins: group-robustness evaluation and mitigations for clip_benchmark.

Plugin authors need only :data:`hookimpl` and the records in :mod:`clip_robust_plugins.records`.
"""

from .hookspecs import hookimpl
from .records import (
    CheckpointSpec,
    DatasetRequest,
    DatasetSpec,
    MetricSpec,
    MitigationSpec,
    ModelLoaderSpec,
    Needs,
    Predictions,
    RegionProposerSpec,
    SampleViews,
    ViewProviderSpec,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointSpec",
    "DatasetRequest",
    "DatasetSpec",
    "MetricSpec",
    "MitigationSpec",
    "ModelLoaderSpec",
    "Needs",
    "Predictions",
    "RegionProposerSpec",
    "SampleViews",
    "ViewProviderSpec",
    "__version__",
    "hookimpl",
]
