"""Discovery on a split of a run: region embeddings (cached feature kind), boxes and region
labels from a decode-only pass, the zero-shot scores, then the numpy core."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...datasets.base import DatasetError, SampleImage
from ...specs import Box
from ..base import RunContext
from .configs import DiscoveryConfig
from .discovery import Discovery, discover_from_embeddings, precision_at_k
from .proposers import as_boxes, proposed_boxes, region_kind


class RegionMeta:
    """Sample transform of the decode-only pass: boxes, validity and region labels of one sample."""

    wants_sample = True

    def __init__(self, proposer: Callable, truth_key: str):
        self.proposer = proposer
        self.truth_key = truth_key

    def __call__(self, sample: SampleImage) -> dict[str, torch.Tensor]:
        boxes, valid = proposed_boxes(self.proposer, sample)
        truth = torch.full((len(boxes),), -1, dtype=torch.int8)
        present = torch.tensor(-1, dtype=torch.int8)
        if self.truth_key in sample.meta:
            value = sample.meta[self.truth_key]
            labelled = [] if value is None else as_boxes(value)
            if labelled is None:
                raise DatasetError(f"sample {sample.key!r}: metadata {self.truth_key!r} is not a box, a list of boxes "
                                   f"or null: {value!r}")
            truth = torch.tensor([region_is_labelled(box, labelled) for box in boxes], dtype=torch.int8)
            present = torch.tensor(int(bool(labelled)), dtype=torch.int8)
        return {"boxes": torch.tensor(boxes, dtype=torch.int64), "valid": torch.tensor(valid),
                "truth": truth, "present": present}


def region_is_labelled(box: Box, labelled: Sequence[Box]) -> bool:
    """A region shows the labelled feature when the feature covers at least half of it, or it
    holds at least half of one labelled box: a full-quadrant patch (spurious_quadrants) and a
    marker a fifth of the image wide (clipworld's patch task) both count in their quadrant."""
    return _covered(box, labelled) >= 0.5 or any(_inside(label, box) >= 0.5 for label in labelled)


def _covered(box: Box, labelled: Sequence[Box]) -> float:
    """Fraction of ``box``'s area covered by the union of ``labelled`` boxes (pixel count)."""
    x0, y0, x1, y1 = box
    cover = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for lx0, ly0, lx1, ly1 in labelled:
        cover[max(ly0, y0) - y0:max(min(ly1, y1) - y0, 0), max(lx0, x0) - x0:max(min(lx1, x1) - x0, 0)] = True
    return float(cover.mean())


def _inside(label: Box, box: Box) -> float:
    """Fraction of ``label``'s area that lies inside ``box``."""
    lx0, ly0, lx1, ly1 = label
    area = max(lx1 - lx0, 0) * max(ly1 - ly0, 0)
    if area == 0:
        return 0.0
    w = max(min(lx1, box[2]) - max(lx0, box[0]), 0)
    h = max(min(ly1, box[3]) - max(ly0, box[1]), 0)
    return w * h / area


@dataclass(frozen=True)
class RegionInfo:
    """The decode-only pass over a split, row-aligned with its features."""

    boxes: np.ndarray  # (N, R, 4)
    valid: np.ndarray  # (N, R) bool
    truth: np.ndarray | None  # (N, R) bool, region labels (None: the dataset has none)
    present: np.ndarray | None  # (N,) bool, image has the labelled feature


def read_region_info(ctx: RunContext, split: str, proposer: Callable, truth_key: str,
                     keys: Sequence[str]) -> RegionInfo:
    """Boxes and region labels of ``split``, in the order of ``keys`` (images are decoded, not encoded)."""
    loader = torch.utils.data.DataLoader(
        ctx.dataset.samples(split, RegionMeta(proposer, truth_key)),
        batch_size=ctx.extractor.batch_size, num_workers=ctx.extractor.num_workers,
    )
    rows: dict[str, dict[str, np.ndarray]] = {}
    bar = tqdm(desc=f"{split}: region boxes", unit="img", disable=not ctx.progress, file=sys.stderr, leave=False)
    with bar:
        for batch_keys, meta, _fields in loader:
            for i, key in enumerate(batch_keys):
                rows[key] = {k: v[i].numpy() for k, v in meta.items()}
            bar.update(len(batch_keys))
    missing = [k for k in keys if k not in rows]
    if missing:
        raise DatasetError(f"split {split!r}: sample {missing[0]!r} of the features was not found again")
    boxes = np.stack([rows[k]["boxes"] for k in keys])
    valid = np.stack([rows[k]["valid"] for k in keys]).astype(bool)
    truth = np.stack([rows[k]["truth"] for k in keys])
    present = np.array([rows[k]["present"] for k in keys])
    labelled = (truth >= 0).all() and (present >= 0).all()
    return RegionInfo(boxes, valid, truth.astype(bool) if labelled else None, present.astype(bool) if labelled else None)


@dataclass
class DiscoveryRun:
    """Discovery on one split of a run, with what the report and the mitigation need."""

    split: str
    proposer_name: str
    proposer_config: str
    keys: tuple[str, ...]
    y: np.ndarray
    pred: np.ndarray
    classnames: list[str]
    regions: RegionInfo
    region_emb: np.ndarray  # (N, R, D)
    result: Discovery
    seed: int
    config: DiscoveryConfig
    seconds: dict[str, float] = field(default_factory=dict)

    def medoid_embeddings(self) -> np.ndarray:
        """(k, D) embeddings of the cluster medoids."""
        ids = self.result.region_ids[self.result.clustering.medoids]
        return self.region_emb[ids[:, 0], ids[:, 1]]

    def top_regions(self, cluster: int, n: int) -> list[tuple[int, int, float]]:
        """(image row, region index, similarity to the medoid) of a kept cluster's ``n`` best regions."""
        ranked = self.result.ranked_regions[cluster][:n]
        return [(int(self.result.region_ids[m, 0]), int(self.result.region_ids[m, 1]),
                 float(self.result.similarity[m])) for m in ranked]

    def precision(self, k: int = 10) -> float | None:
        if self.regions.truth is None:
            return None
        top = self.result.top_cluster
        if top is None:
            return 0.0
        truth = self.regions.truth[self.result.region_ids[:, 0], self.result.region_ids[:, 1]]
        return precision_at_k(self.result.ranked_regions[top], truth, k)

    def summary(self) -> dict[str, Any]:
        """The short form recorded by the mitigation."""
        top = self.result.top_cluster
        score = self.result.scores[top] if top is not None else None
        return {
            "split": self.split, "regions": self.proposer_config, "k": self.result.clustering.k,
            "top_cluster": top,
            "top_cluster_G": score.performance_gap if score else None,
            "top_cluster_H": score.influence if score else None,
            "affected_class": self.classnames[score.affected_class()] if score and score.affected_class() is not None else None,
            "n_kept_clusters": len(self.result.ranking),
            "precision@10": self.precision(10),
        }


def discover(ctx: RunContext, split: str, proposer_name: str, proposer: Callable,
             config: DiscoveryConfig | None = None, truth_key: str = "spurious_box") -> DiscoveryRun:
    """RaVL discovery on ``split`` of a run (class labels only; see docs/methods/ravl.md)."""
    config = config or DiscoveryConfig()
    t0 = time.perf_counter()
    image = ctx.features(split, "image")
    regions_fs = ctx.features(split, region_kind(proposer))
    if regions_fs.keys != image.keys:
        raise DatasetError(f"split {split!r}: region and image features list different samples")
    t_features = time.perf_counter()
    info = read_region_info(ctx, split, proposer, truth_key, image.keys)
    t_boxes = time.perf_counter()
    head = ctx.zeroshot_head().float().cpu()
    y = image.y.numpy()  # the class field only: group fields are never read here
    pred = ctx.zeroshot_logits(image.features).argmax(1).numpy()
    region_emb = regions_fs.features.float()
    region_scores = torch.softmax(region_emb @ head / config.temperature, dim=-1).numpy()
    region_emb = region_emb.numpy()
    result = discover_from_embeddings(region_emb, info.valid, y, pred, region_scores, ctx.n_classes,
                                      config, ctx.seed, progress=ctx.progress)
    t_end = time.perf_counter()
    return DiscoveryRun(
        split=split, proposer_name=proposer_name, proposer_config=proposer.config, keys=image.keys, y=y, pred=pred,
        classnames=list(ctx.classnames), regions=info, region_emb=region_emb, result=result, seed=ctx.seed,
        config=config,
        seconds={"features": round(t_features - t0, 3), "boxes": round(t_boxes - t_features, 3),
                 "clustering_and_scores": round(t_end - t_boxes, 3)},
    )
