"""Region-level accuracy: zero-shot classification of the labelled object region alone.

For datasets whose samples carry the class object's region in their json (``object_region``
as a box, or ``regions`` + ``object_quadrant`` as in robust/spurious_quadrants), each method
with an image encoder gets ``region_acc`` and ``region_worst_group_acc`` (the image's
groups).  The region is cropped and encoded by the method's image encoder; the crops of the
baseline are a cached feature kind.  Definition: docs/methods/ravl.md.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from ...datasets.base import DatasetError, SampleImage
from ...specs import Box, Predictions
from .proposers import as_boxes

KIND_NAME = "object_region"
_SUPPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ctx -> {split: bool}


def object_box(meta: dict) -> Box | None:
    """The object's region from a sample's json: ``object_region``, or ``regions[object_quadrant]``."""
    if meta.get(KIND_NAME) is not None:
        boxes = as_boxes(meta[KIND_NAME])
        return boxes[0] if boxes else None
    regions, q = meta.get("regions"), meta.get("object_quadrant")
    if isinstance(q, int) and isinstance(regions, (list, tuple)) and 0 <= q < len(regions):
        boxes = as_boxes(regions[q])
        return boxes[0] if boxes else None
    return None


class ObjectRegionCrop:
    """``derive`` of the object-region kind: the object's region cropped from the image."""

    def __call__(self, sample: SampleImage) -> list:
        box = object_box(sample.meta)
        if box is None:
            raise DatasetError(f"sample {sample.key!r}: no object region (json 'object_region' or "
                               f"'regions' + 'object_quadrant') while other samples of its split have one")
        return [sample.image.crop(box)]


class _Meta:
    wants_sample = True

    def __call__(self, sample: SampleImage) -> dict:
        return dict(sample.meta)


def object_region_kind():
    from ...features import ImageSetKind

    return ImageSetKind(name=KIND_NAME, derive=ObjectRegionCrop(), count=1, config="object_region|regions[object_quadrant]")


def has_object_regions(ctx, split: str) -> bool:
    """Whether ``split``'s samples carry an object region.

    Decided from the dataset's record of its annotations (``sample_annotations``: grouped shards
    written by this package keep it in groups.json) without reading a sample; for a local dataset
    without that record, from its first sample (one decode); a remote one without it: no."""
    seen = _SUPPORTED.setdefault(ctx, {})
    if split not in seen:
        record = ctx.dataset.sample_annotations(split)
        if record is not None and "json_keys" in record:
            keys, n = record["json_keys"], record.get("samples")
            seen[split] = keys.get(KIND_NAME) == n or (keys.get("regions") == n and keys.get("object_quadrant") == n)
        elif getattr(getattr(ctx.dataset, "source", None), "remote", False):
            seen[split] = False
        else:
            first = next(iter(ctx.dataset.samples(split, _Meta())), None)
            seen[split] = first is not None and isinstance(first[1], dict) and object_box(first[1]) is not None
    return seen[split]


def region_metrics(preds: Predictions, *, ctx, mitigation) -> dict[str, Any]:
    """``region_acc`` and ``region_worst_group_acc`` of one method ({} without object regions or encoder)."""
    if not has_object_regions(ctx, preds.split):
        return {}
    from ...accuracy import worst_group_accuracy
    from ...features import FeatureCache, FeatureExtractor
    from .training import logits_with_head, own_zeroshot_head

    kind = object_region_kind()
    spec = ctx.registry.mitigations.get(preds.method)
    if spec is not None and spec.baseline:  # the run's own model: cached crops and head
        fs = ctx.features(preds.split, kind)
        head = ctx.zeroshot_head()
    else:
        model = mitigation.as_open_clip(ctx)
        if model is None:
            return {}
        model = model.to(ctx.device).eval()
        extractor = FeatureExtractor(
            model, ctx.transform, model_type=ctx.extractor.model_type, model_name=ctx.extractor.model_name,
            pretrained=f"{ctx.extractor.pretrained_id}+{preds.method}", device=ctx.device, amp=ctx.amp,
            batch_size=ctx.extractor.batch_size, num_workers=ctx.extractor.num_workers,
            cache=FeatureCache(None), progress=ctx.progress,
        )
        fs = extractor.extract(ctx.dataset, ctx.dataset_name, preds.split, [kind])[KIND_NAME]
        head = own_zeroshot_head(ctx, model)
    if tuple(fs.keys) != tuple(preds.keys):
        raise DatasetError(f"region metric: split {preds.split!r} was read in another order than its predictions")
    pred = logits_with_head(ctx, fs.features[:, 0], head).argmax(1).numpy()
    y = np.asarray(preds.y)
    groups = preds.schema.group_ids(preds.fields)
    return {"region_acc": float((pred == y).mean()),
            "region_worst_group_acc": worst_group_accuracy(pred, y, np.asarray(groups))}
