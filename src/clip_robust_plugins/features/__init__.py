"""Feature extraction with an on-disk cache (see :mod:`.cache` for the file format).

Image features are computed once per (model type, model, checkpoint, dataset, split, kind,
precision, device type, software versions) and stored as one safetensors file per key, so
several methods and repeated runs share one read of each split.
"""

from .cache import (
    CACHE_FORMAT,
    ENV_CACHE_DIR,
    HEAD_KIND,
    CacheKey,
    FeatureCache,
    default_cache_dir,
    pretrained_identity,
    software_versions,
)
from .extractor import FeatureExtractor
from .kinds import FeatureKind, FeatureSet, ImageSetKind, kind_name
from .towers import (
    DERIVED_KINDS,
    FEATURE_KINDS,
    HEAD_ADAPTER,
    HEAD_ATTNPOOL,
    HEAD_TYPES,
    HEAD_VIT_PROJ,
    attnpool_input_shape,
    autocast,
    encode_image_normalized,
    image_from_preproj,
    preproj_features,
    projection_head_type,
)

__all__ = [
    "CACHE_FORMAT", "DERIVED_KINDS", "ENV_CACHE_DIR", "FEATURE_KINDS", "HEAD_ADAPTER", "HEAD_ATTNPOOL", "HEAD_KIND",
    "HEAD_TYPES", "HEAD_VIT_PROJ", "CacheKey", "FeatureCache", "FeatureExtractor", "FeatureKind", "FeatureSet",
    "ImageSetKind", "attnpool_input_shape", "autocast", "default_cache_dir", "encode_image_normalized",
    "image_from_preproj", "kind_name", "preproj_features", "pretrained_identity", "projection_head_type",
    "software_versions",
]
