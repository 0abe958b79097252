"""RaVL: region-level discovery of learned spurious correlations, and region-aware fine-tuning.

Varma, Delbrouck, Chen, Chaudhari & Langlotz, "RaVL: Discovering and Mitigating
Spurious Correlations in Fine-Tuned Vision-Language Models", NeurIPS 2024
(arXiv 2411.04097).  The authors' repository (Stanford-AIMI/RaVL: ``ravl/discover.py``,
``ravl/discover_utils.py``, ``ravl/zeroshot_utils.py``, ``demo_mnist.ipynb``) was read for
the discovery protocol; it ships no mitigation code.  Nothing of it is copied.

Discovery (``discover`` below; ``clip_benchmark_robust discover`` on the command line)
---------------------------------------------------------------------------------
Input: a class-labelled split (``val`` by default) and a model; no group labels.

1. **Regions.**  A registered region proposer (hook ``register_region_proposers``) gives
   each image the same number of boxes: ``quadrants`` (2 x 2, the authors' setting),
   ``grid`` (``--ravl_grid`` N x N) or ``boxes`` (boxes stored in each sample's json under
   ``--ravl_boxes_key``, padded to ``--ravl_max_boxes`` by repeating the last one; padded
   duplicates are marked invalid and take part in nothing).
2. **Region embeddings**: every box is cropped from the decoded image and goes through
   the model's own preprocessing and image tower (crop-and-encode works for every tower),
   cached like any feature kind
   (:class:`~clip_robust_plugins.features.ImageSetKind`, (N, R, D)).
3. **Zero-shot scores**: images are classified with clip_benchmark's zero-shot head
   (``ctx.zeroshot_head()``, the prompt ensemble the authors' ``get_txt_embs`` also
   builds); regions get a softmax over classes of ``region @ head / 0.07`` (their
   ``zero_shot_cls``).
4. **Clustering**: K-Medoids (FasterPAM, the maintained ``kmedoids`` package) on the
   cosine distance ``1 - cos``, clipped to [0, 1] with a zero diagonal as the authors
   do, for every K in ``2|Y| .. 5|Y| - 1`` (their ``np.arange(2C, 5C)``); the K with the
   highest silhouette on the same precomputed distances wins (ties: the smaller K).
   *Deviation:* the authors use scikit-learn-extra's ``k-medoids++`` initialisation
   (``random_state=0``); kmedoids offers ``random`` (default here, seeded by ``--seed``)
   and the deterministic PAM ``build`` (``--ravl_kmedoids_init build``).  Distances are
   float32 to halve the memory of the M x M matrix (M regions).
5. **Scores per cluster c** (their ``identify``):

   - images "with c": images having at least one region in c.  For every class y that
     occurs among them, ``p_in^y`` is the accuracy on class-y images with c and
     ``p_out^y`` on class-y images without c (a class lacking either side is skipped);
     the class gap is ``w_y (p_in^y - p_out^y)`` with ``w_y = 2 min(n_in, n_out) / (n_in + n_out)``
     and ``G_c = sum_y |class gap|``.
   - influence ``H_c``: for each image, its *top region for the predicted class* is the
     region with the highest softmax score for the class the image was predicted as
     (images with a single valid region have none).  Among the *misclassified* images
     with c whose true class has a *negative* gap, ``H_c`` is the share whose top
     region lies in c, computed per class and maximised over those classes (their
     ``computer_cluster_influence_scores``; DESIGN.md's "share of misclassified images"
     made exact).  No such image: ``H_c`` is undefined and the cluster is dropped.
   - kept: ``H_c >= 0.25`` and at least one positive and one negative class gap;
     ranked by ``G_c`` (descending; ties by cluster id).  A kept cluster's regions are
     ranked by cosine similarity to its medoid.

   The *affected class* of a cluster is the class with the largest positive gap (the
   textual attribute the feature is spuriously tied to, as in the authors' demo); the
   *harmed classes* are those with negative gaps.
6. **Report**: a JSON (clusters, scores, per-class accuracy with and without the
   feature, top regions with image keys and boxes, timings) and a PNG sheet of the top
   cluster's regions beside images of the affected and harmed classes.  Where the
   dataset has region labels (``--ravl_truth_key``, ``spurious_box`` in
   ``robust/spurious_quadrants``), it adds ``precision@10`` (share of the top cluster's 10
   best-ranked regions that show the planted feature, i.e. at least half of the region
   is covered by the labelled box; 0 when no cluster is kept) and RaVL's validity check
   (the model has learned the correlation: the accuracy of the class the feature helps
   most rises by more than 10 points with the feature, and the accuracy of the other
   classes, pooled, falls by more than 10 points).  Region labels are read only for these
   two evaluations, after discovery.

Mitigation ``ravl`` and the baseline ``clip_ft``
------------------------------------------------
Both fine-tune a copy of the **image tower** (every parameter of ``model.visual``; the
text tower and the logit scale stay frozen) on train image-caption pairs, and both are
open_clip-compatible models afterwards (``as_open_clip``; model types ``ravl`` /
``clip_ft`` rebuild them from a saved state).  Captions are the dataset's zero-shot
templates filled with the class name (one template drawn per image and step), and the
class label of each caption is *parsed from the caption* (the class name found in it),
as RaVL does for real image-text data.

- ``clip_ft``: ``L = L_CLIP``, the CLIP loss at temperature 0.07 between the batch
  images and captions (symmetric cross-entropy; captions of the same class count as
  positives, since a batch repeats them).
- ``ravl``: discovery (above) on the ``--ravl_discovery_split`` (``val``) with the
  model before fine-tuning; every train region is assigned to its nearest medoid
  (cosine, crop embeddings of the model before fine-tuning, cached) and the regions of
  the **top-ranked cluster** are *spurious*; then ``L = 0.8 L_CLIP + 0.2 (L_R + L_A)``,
  temperature 0.07 everywhere, with the label embeddings of the batch's classes taken
  from the frozen zero-shot head.  In the loss a region's embedding comes, for open_clip
  ViT towers (``--ravl_region_features auto``/``tokens``), from the image's *own* forward
  pass: the patch tokens the region covers in the preprocessed image, averaged and sent
  through the tower's head (``proj``), like RoI pooling on a feature map, so the region
  terms act on the very features the image embedding is made of, at no extra forward.
  Other towers (or ``crops``) crop and encode every region (``1 + R`` forwards per
  image).  On spurious_quadrants the crop variant made worst-group accuracy *worse* than
  the CLIP loss alone even with the true patch regions as the spurious set, while the
  token variant did not (README, "Discovery (RaVL)"); hence the default.

  - ``L_R`` (region -> label): every non-spurious region is classified over the
    labels present in the batch towards its image's label (cross-entropy), pulling
    it to the label and away from the other labels;
  - ``L_A`` (label -> regions): for each label in the batch, a multi-positive InfoNCE
    over regions whose positives are the non-spurious regions of that label's images
    and whose negatives are *all* spurious regions of the batch, so spurious regions
    are pushed away from every label.

  *Caveat:* the paper's exact L_R/L_A formulas were not available to us (the paper's
  text could not be retrieved here and the authors' code has no mitigation); the terms
  follow DESIGN.md §4's description.  Both are means over their regions/labels (a sum
  over the batch would scale the 0.2 weight with the batch size).
  No spurious cluster kept: ``L_A`` is zero and ``L_R`` uses every region (a warning says so).

Training: AdamW (``--ravl_lr`` 1e-5, ``--ravl_weight_decay`` 0.1, batch 64) for
``--ravl_epochs`` (1) epochs at a constant rate, the last epoch's weights kept (no
model selection: no group labels anywhere).  The train split streams from its shards
through a seeded shuffle buffer (``--ravl_shuffle_buffer``), so memory stays bounded for
real datasets.  Every ``--ravl_*`` training flag applies to ``clip_ft`` too, so the two
differ only in the loss.  Randomness: ``ctx.rng`` (shuffling, caption templates) and
k-medoids' ``random_state = ctx.seed``; never the global generators.

Cost (see README): discovery = an image pass and a region pass (``R`` crops per image,
both cached), a decode-only pass for the boxes and ``3|Y|`` FasterPAM runs on an
M x M matrix; ``ravl`` training = one region pass over train (cached) and, per image and
epoch, one image-tower forward and backward with token regions (``1 + R`` with crops;
``clip_ft``: one), plus ``R`` cheap mask transforms per image.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..argtypes import at_least, config_from_options, fraction, positive_float
from ..datasets.base import DatasetError, SampleImage
from ..features import FeatureCache, FeatureExtractor, ImageSetKind, autocast
from ..hookspecs import hookimpl
from ..records import Box, MitigationSpec, ModelLoaderSpec, Needs, RegionProposerSpec
from ..states import StateError, load_base_model
from .base import Mitigation, RunContext

NAME = "ravl"
BASELINE = "clip_ft"
REPORT_FORMAT = "clip_robust_plugins.ravl_discovery/1"
CITATION = (
    "Varma, Delbrouck, Chen, Chaudhari & Langlotz, RaVL: Discovering and Mitigating Spurious Correlations "
    "in Fine-Tuned Vision-Language Models, NeurIPS 2024"
)
#: the temperature of RaVL's zero-shot softmax and of every loss term
TEMPERATURE = 0.07
KMEDOIDS_INITS = ("random", "build")


# =========================================================================== region proposers


def grid_boxes(width: int, height: int, n: int) -> list[Box]:
    """An ``n`` x ``n`` grid of boxes, row by row (``n = 2``: the quadrants TL, TR, BL, BR)."""
    xs = [round(i * width / n) for i in range(n + 1)]
    ys = [round(j * height / n) for j in range(n + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(n) for i in range(n)]


class GridProposer:
    """``n`` x ``n`` equal boxes per image (``quadrants`` is ``n = 2``, RaVL's synthetic setting)."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"grid size must be at least 1, got {n}")
        self.n = n
        self.count = n * n
        self.config = f"grid{n}"

    def __call__(self, sample: SampleImage) -> list[Box]:
        return grid_boxes(sample.image.width, sample.image.height, self.n)


class BoxesProposer:
    """The boxes a dataset stores in each sample's metadata under ``key``, padded to ``count``.

    A value may be one box ``[x0, y0, x1, y1]`` or a list of them.  Fewer than ``count``
    boxes are padded by repeating the last one (the padding is marked invalid later);
    more are truncated to the first ``count``.
    """

    def __init__(self, key: str, count: int):
        if count < 1:
            raise ValueError(f"--ravl_max_boxes must be at least 1, got {count}")
        self.key = key
        self.count = count
        self.config = f"boxes[{key}]x{count}"

    def __call__(self, sample: SampleImage) -> list[Box]:
        value = sample.meta.get(self.key)
        if value is None:
            raise DatasetError(f"sample {sample.key!r}: no {self.key!r} boxes in its metadata (region proposer 'boxes')")
        boxes = _as_boxes(value)
        if boxes is None or not boxes:
            raise DatasetError(f"sample {sample.key!r}: metadata {self.key!r} is not a box or a list of boxes: {value!r}")
        boxes = boxes[: self.count]
        return boxes + [boxes[-1]] * (self.count - len(boxes))


def _as_boxes(value: Any) -> list[Box] | None:
    """``[x0, y0, x1, y1]`` or a list of those as a list of int tuples (None if neither)."""
    try:
        if len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
            return [tuple(int(round(v)) for v in value)]
        if all(len(b) == 4 for b in value):
            return [tuple(int(round(v)) for v in b) for b in value]
    except TypeError:
        return None
    return None


def proposed_boxes(proposer: Callable, sample: SampleImage) -> tuple[list[Box], list[bool]]:
    """The proposer's boxes for ``sample``, checked, and which of them count (not a repeat of an earlier box)."""
    boxes = [tuple(int(v) for v in b) for b in proposer(sample)]
    count = getattr(proposer, "count", None)
    if count is not None and len(boxes) != count:
        raise DatasetError(f"sample {sample.key!r}: region proposer {proposer.config!r} gave {len(boxes)} boxes, "
                           f"expected {count}")
    w, h = sample.image.size
    for box in boxes:
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise DatasetError(f"sample {sample.key!r}: region box {list(box)} is empty or outside the {w}x{h} image")
    seen: set[Box] = set()
    valid = []
    for box in boxes:
        valid.append(box not in seen)
        seen.add(box)
    return boxes, valid


class RegionCrops:
    """``derive`` of the region feature kind: the proposer's boxes cropped from the image."""

    def __init__(self, proposer: Callable):
        self.proposer = proposer

    def __call__(self, sample: SampleImage) -> list:
        boxes, _ = proposed_boxes(self.proposer, sample)
        return [sample.image.crop(box) for box in boxes]


def region_kind(proposer: Callable) -> ImageSetKind:
    """The cached (N, R, D) feature kind of ``proposer``'s region embeddings."""
    return ImageSetKind(name=f"regions[{proposer.config}]", derive=RegionCrops(proposer), count=proposer.count,
                        config=proposer.config)


def make_proposer(options: argparse.Namespace, registry) -> tuple[str, Callable]:
    """The region proposer named by ``--ravl_regions`` (a registered one, built-in or third party)."""
    name = getattr(options, "ravl_regions", None) or "quadrants"
    spec = registry.region_proposer(name)
    proposer = spec.create(options)
    if not isinstance(getattr(proposer, "count", None), int) or proposer.count < 1 or not hasattr(proposer, "config"):
        from ..plugins import PluginError

        raise PluginError(f"region proposer {name!r} must have an int attribute 'count' (boxes per image, >= 1) "
                          f"and a string attribute 'config'")
    return name, proposer


# =========================================================================== discovery: the core (numpy)


@dataclass(frozen=True)
class DiscoveryConfig:
    """Settings of discovery (defaults: the paper and the authors' code)."""

    influence_threshold: float = 0.25
    temperature: float = TEMPERATURE
    kmedoids_init: str = "random"
    max_iter: int = 100
    #: regions listed in the report and shown in the sheet
    top_regions: int = 10


@dataclass(frozen=True)
class Clustering:
    """K-Medoids result over the clustered (valid) regions."""

    labels: np.ndarray  # (M,) cluster id of each region
    medoids: np.ndarray  # (k,) region index of each cluster's medoid
    silhouettes: dict[int, float]  # K -> silhouette, for every K tried

    @property
    def k(self) -> int:
        return len(self.medoids)


def k_candidates(n_classes: int, n_points: int) -> list[int]:
    """RaVL's sweep ``2|Y| .. 5|Y| - 1``, limited to K < number of regions (silhouette needs it)."""
    return [k for k in range(2 * n_classes, 5 * n_classes) if 2 <= k < n_points]


def cosine_distances(emb: np.ndarray) -> np.ndarray:
    """``1 - cos`` of L2-normalised rows, clipped to [0, 1], zero diagonal (the authors' matrix), float32."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - unit.astype(np.float32) @ unit.astype(np.float32).T
    np.clip(dist, 0.0, 1.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def cluster_regions(emb: np.ndarray, ks: Sequence[int], seed: int, init: str = "random", max_iter: int = 100,
                    progress: bool = False) -> Clustering:
    """FasterPAM for every K in ``ks`` on cosine distances; keep the K with the best silhouette."""
    import kmedoids

    if not ks:
        raise ValueError("no number of clusters to try")
    dist = cosine_distances(emb)
    best = None
    silhouettes: dict[int, float] = {}
    for k in tqdm(ks, desc="ravl: k-medoids", unit="K", disable=not progress, file=sys.stderr, leave=False):
        # n_cpu=1: the parallel variant's result may depend on thread timing
        result = kmedoids.fasterpam(dist, k, max_iter=max_iter, init=init, random_state=seed, n_cpu=1)
        labels = np.asarray(result.labels, dtype=np.int64)
        score = float(kmedoids.silhouette(dist, labels, n_cpu=1)[0])
        silhouettes[k] = score
        if best is None or score > best[0]:
            best = (score, labels, np.asarray(result.medoids, dtype=np.int64))
    return Clustering(labels=best[1], medoids=best[2], silhouettes=silhouettes)


@dataclass(frozen=True)
class ClassGap:
    """One class's accuracy on images with and without a cluster's feature."""

    n_in: int
    acc_in: float
    n_out: int
    acc_out: float

    @property
    def weight(self) -> float:
        return 2.0 * min(self.n_in, self.n_out) / (self.n_in + self.n_out)

    @property
    def gap(self) -> float:
        """``w_y (p_in - p_out)``: the weighted class performance gap."""
        return self.weight * (self.acc_in - self.acc_out)


def class_gaps(with_feature: np.ndarray, y: np.ndarray, pred: np.ndarray) -> dict[int, ClassGap]:
    """Per class occurring among the images with the feature: accuracy with vs without it."""
    gaps: dict[int, ClassGap] = {}
    correct = pred == y
    for c in np.unique(y[with_feature]):
        inside = with_feature & (y == c)
        outside = ~with_feature & (y == c)
        if not inside.any() or not outside.any():
            continue
        gaps[int(c)] = ClassGap(int(inside.sum()), float(correct[inside].mean()), int(outside.sum()),
                                float(correct[outside].mean()))
    return gaps


def top_regions_for_prediction(region_scores: np.ndarray, valid: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per image, the valid region scoring highest for the image's predicted class (-1: fewer than 2 regions)."""
    scores = region_scores[np.arange(len(pred)), :, pred]  # (N, R): each region's score for the predicted class
    scores = np.where(valid, scores, -np.inf)
    top = scores.argmax(axis=1)
    return np.where(valid.sum(axis=1) >= 2, top, -1)


def influence_score(in_cluster: np.ndarray, top: np.ndarray, y: np.ndarray, pred: np.ndarray,
                    gaps: Mapping[int, ClassGap]) -> float | None:
    """``H_c``: among misclassified images with the feature whose class has a negative gap, the
    share whose top region lies in the cluster, per class, maximised over classes (None if no such image)."""
    with_feature = in_cluster.any(axis=1)
    shares = []
    for c, g in gaps.items():
        if g.gap >= 0:
            continue
        images = np.flatnonzero(with_feature & (y == c) & (pred != y) & (top >= 0))
        if len(images):
            shares.append(float(in_cluster[images, top[images]].mean()))
    return max(shares) if shares else None


@dataclass(frozen=True)
class ClusterScore:
    """RaVL's scores of one cluster."""

    cluster: int
    n_regions: int
    n_images: int
    gaps: dict[int, ClassGap]
    performance_gap: float  # G_c
    influence: float | None  # H_c
    spurious_pattern: bool  # a positive and a negative class gap
    kept: bool

    def affected_class(self) -> int | None:
        positive = [(g.gap, c) for c, g in self.gaps.items() if g.gap > 0]
        return max(positive)[1] if positive else None

    def harmed_classes(self) -> list[int]:
        return sorted(c for c, g in self.gaps.items() if g.gap < 0)


@dataclass(frozen=True)
class Discovery:
    """The outcome of discovery on one split: clusters, their scores, the ranking."""

    clustering: Clustering
    region_ids: np.ndarray  # (M, 2): (image row, region index) of each clustered region
    scores: list[ClusterScore]
    ranking: list[int]  # kept clusters, best first
    ranked_regions: dict[int, np.ndarray]  # kept cluster -> clustered-region indices, most medoid-like first
    similarity: np.ndarray  # (M,) cosine similarity of each region to its cluster's medoid
    top_region: np.ndarray  # (N,) top region for the predicted class (-1: none)

    @property
    def top_cluster(self) -> int | None:
        return self.ranking[0] if self.ranking else None

    def cluster_map(self, shape: tuple[int, int]) -> np.ndarray:
        """(N, R) cluster id of every region (-1 for invalid ones)."""
        out = np.full(shape, -1, dtype=np.int64)
        out[self.region_ids[:, 0], self.region_ids[:, 1]] = self.clustering.labels
        return out


def discover_from_embeddings(region_emb: np.ndarray, valid: np.ndarray, y: np.ndarray, pred: np.ndarray,
                             region_scores: np.ndarray, n_classes: int, config: DiscoveryConfig, seed: int,
                             progress: bool = False) -> Discovery:
    """RaVL discovery on precomputed arrays (no model, no group labels).

    ``region_emb`` (N, R, D) normalised region embeddings, ``valid`` (N, R) bool,
    ``y`` (N,) class labels, ``pred`` (N,) zero-shot image predictions,
    ``region_scores`` (N, R, C) per-region class probabilities.
    """
    region_ids = np.argwhere(valid)
    emb = region_emb[valid]
    ks = k_candidates(n_classes, len(emb))
    if not ks:
        raise ValueError(f"{len(emb)} regions are too few to try 2|Y| = {2 * n_classes} clusters")
    clustering = cluster_regions(emb, ks, seed, config.kmedoids_init, config.max_iter, progress)
    cmap = np.full(valid.shape, -1, dtype=np.int64)
    cmap[region_ids[:, 0], region_ids[:, 1]] = clustering.labels
    top = top_regions_for_prediction(region_scores, valid, pred)
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    similarity = np.einsum("md,md->m", unit, unit[clustering.medoids[clustering.labels]])
    scores = []
    for c in range(clustering.k):
        in_cluster = cmap == c
        with_feature = in_cluster.any(axis=1)
        gaps = class_gaps(with_feature, y, pred)
        h = influence_score(in_cluster, top, y, pred, gaps)
        pattern = any(g.gap > 0 for g in gaps.values()) and any(g.gap < 0 for g in gaps.values())
        scores.append(ClusterScore(
            cluster=c, n_regions=int(in_cluster.sum()), n_images=int(with_feature.sum()), gaps=gaps,
            performance_gap=float(sum(abs(g.gap) for g in gaps.values())), influence=h, spurious_pattern=pattern,
            kept=pattern and h is not None and h >= config.influence_threshold,
        ))
    ranking = sorted((s.cluster for s in scores if s.kept), key=lambda c: (-scores[c].performance_gap, c))
    ranked_regions = {}
    for c in ranking:
        members = np.flatnonzero(clustering.labels == c)
        ranked_regions[c] = members[np.lexsort((members, -similarity[members]))]
    return Discovery(clustering, region_ids, scores, ranking, ranked_regions, similarity, top)


def precision_at_k(ranked: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Share of the first ``k`` ranked regions that are labelled spurious (fewer regions: of those)."""
    head = np.asarray(ranked[:k])
    return float(truth[head].mean()) if len(head) else 0.0


def validity_check(pred: np.ndarray, y: np.ndarray, present: np.ndarray, classnames: Sequence[str],
                   threshold: float = 0.10) -> dict[str, Any]:
    """RaVL's check that the model learned the planted correlation (needs image-level ground truth).

    ``gap_y = acc(y | feature present) - acc(y | absent)``.  The favoured class is the one
    with the largest gap; the setting is valid when its gap exceeds ``threshold`` and the
    pooled gap of all other classes is below ``-threshold``.
    """
    correct = pred == y
    gaps: dict[str, Any] = {}
    for c, name in enumerate(classnames):
        w, wo = (y == c) & present, (y == c) & ~present
        if w.any() and wo.any():
            gaps[name] = {"acc_with": float(correct[w].mean()), "n_with": int(w.sum()),
                          "acc_without": float(correct[wo].mean()), "n_without": int(wo.sum()),
                          "gap": float(correct[w].mean() - correct[wo].mean())}
    if not gaps:
        return {"valid": False, "reason": "no class has images both with and without the feature", "classes": gaps}
    favoured = max(gaps, key=lambda name: gaps[name]["gap"])
    fav = classnames.index(favoured)
    others_w, others_wo = (y != fav) & present, (y != fav) & ~present
    pooled = float(correct[others_w].mean() - correct[others_wo].mean()) if others_w.any() and others_wo.any() else 0.0
    return {
        "valid": bool(gaps[favoured]["gap"] > threshold and pooled < -threshold),
        "threshold": threshold,
        "favoured_class": favoured,
        "favoured_gap": gaps[favoured]["gap"],
        "other_classes_gap": pooled,
        "classes": gaps,
    }


# =========================================================================== discovery on a run context


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
            labelled = [] if value is None else _as_boxes(value)
            if labelled is None:
                raise DatasetError(f"sample {sample.key!r}: metadata {self.truth_key!r} is not a box, a list of boxes "
                                   f"or null: {value!r}")
            truth = torch.tensor([_covered(box, labelled) >= 0.5 for box in boxes], dtype=torch.int8)
            present = torch.tensor(int(bool(labelled)), dtype=torch.int8)
        return {"boxes": torch.tensor(boxes, dtype=torch.int64), "valid": torch.tensor(valid),
                "truth": truth, "present": present}


def _covered(box: Box, labelled: Sequence[Box]) -> float:
    """Fraction of ``box``'s area covered by the union of ``labelled`` boxes (pixel count)."""
    x0, y0, x1, y1 = box
    cover = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for lx0, ly0, lx1, ly1 in labelled:
        cover[max(ly0, y0) - y0:max(min(ly1, y1) - y0, 0), max(lx0, x0) - x0:max(min(lx1, x1) - x0, 0)] = True
    return float(cover.mean())


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
    """RaVL discovery on ``split`` of a run (class labels only; see the module docstring)."""
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
    result = discover_from_embeddings(region_emb.numpy(), info.valid, y, pred, region_scores, ctx.n_classes,
                                      config, ctx.seed, progress=ctx.progress)
    t_end = time.perf_counter()
    return DiscoveryRun(
        split=split, proposer_name=proposer_name, proposer_config=proposer.config, keys=image.keys, y=y, pred=pred,
        classnames=list(ctx.classnames), regions=info, region_emb=region_emb.numpy(), result=result, seed=ctx.seed,
        config=config,
        seconds={"features": round(t_features - t0, 3), "boxes": round(t_boxes - t_features, 3),
                 "clustering_and_scores": round(t_end - t_boxes, 3)},
    )


# =========================================================================== the report (JSON + PNG)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def build_report(run: DiscoveryRun, provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The discovery report as a JSON-able dict (format :data:`REPORT_FORMAT`)."""
    res, names = run.result, run.classnames
    correct = run.pred == run.y
    clusters = []
    for s in res.scores:
        medoid = res.region_ids[res.clustering.medoids[s.cluster]]
        clusters.append({
            "cluster": s.cluster, "n_regions": s.n_regions, "n_images": s.n_images,
            "performance_gap": _round(s.performance_gap), "influence": _round(s.influence),
            "spurious_pattern": s.spurious_pattern, "kept": s.kept,
            "rank": res.ranking.index(s.cluster) if s.kept else None,
            "affected_class": names[s.affected_class()] if s.affected_class() is not None else None,
            "harmed_classes": [names[c] for c in s.harmed_classes()],
            "per_class": {names[c]: {"acc_with": _round(g.acc_in), "n_with": g.n_in, "acc_without": _round(g.acc_out),
                                     "n_without": g.n_out, "weight": _round(g.weight), "gap": _round(g.gap)}
                          for c, g in sorted(s.gaps.items())},
            "medoid": {"key": run.keys[medoid[0]], "region": int(medoid[1]),
                       "box": run.regions.boxes[medoid[0], medoid[1]].tolist()},
        })
    top = res.top_cluster
    top_entry = None
    if top is not None:
        score = res.scores[top]
        top_entry = {
            "cluster": top,
            "affected_class": names[score.affected_class()] if score.affected_class() is not None else None,
            "harmed_classes": [names[c] for c in score.harmed_classes()],
            "performance_gap": _round(score.performance_gap), "influence": _round(score.influence),
            "top_regions": [{"key": run.keys[i], "region": r, "box": run.regions.boxes[i, r].tolist(),
                             "similarity": _round(sim), "class": names[run.y[i]], "predicted": names[run.pred[i]]}
                            for i, r, sim in run.top_regions(top, run.config.top_regions)],
        }
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        **provenance,
        "split": run.split, "seed": run.seed,
        "labels_used": ["class"],
        "regions": {"proposer": run.proposer_name, "config": run.proposer_config,
                    "per_image": int(run.regions.valid.shape[1]), "n_images": len(run.keys),
                    "n_regions": int(run.regions.valid.sum())},
        "classnames": names,
        "image_accuracy": _round(correct.mean()),
        "per_class_accuracy": {n: _round(correct[run.y == c].mean()) if (run.y == c).any() else None
                               for c, n in enumerate(names)},
        "clustering": {"algorithm": "FasterPAM (kmedoids), cosine distance clipped to [0, 1]",
                       "init": run.config.kmedoids_init, "k_tried": sorted(res.clustering.silhouettes),
                       "silhouettes": {str(k): _round(v) for k, v in sorted(res.clustering.silhouettes.items())},
                       "k": res.clustering.k},
        "influence_threshold": run.config.influence_threshold,
        "ranked_clusters": res.ranking,
        "top_cluster": top_entry,
        "clusters": clusters,
    }
    if run.regions.truth is not None:
        report["precision@10"] = _round(run.precision(10))
        report["validity"] = validity_check(run.pred, run.y, run.regions.present, names)
    report["seconds"] = dict(run.seconds)
    return report


def collect_samples(ctx: RunContext, split: str, keys: set[str]) -> dict[str, SampleImage]:
    """The decoded samples of ``keys`` (one pass over the split, stopping once all are found)."""
    found: dict[str, SampleImage] = {}
    if not keys:
        return found
    for key, sample, _fields in ctx.dataset.samples(split, _WholeSample()):
        if key in keys:
            found[key] = sample
            if len(found) == len(keys):
                break
    return found


class _WholeSample:
    wants_sample = True

    def __call__(self, sample: SampleImage) -> SampleImage:
        return sample


def sheet_rows(run: DiscoveryRun, per_row: int = 5) -> list[tuple[str, list[tuple[int, int | None, str]]]]:
    """What the sheet shows: (row title, [(image row, region index or None, caption)])."""
    top = run.result.top_cluster
    if top is None:
        return []
    score = run.result.scores[top]
    cmap = run.result.cluster_map(run.regions.valid.shape)
    rows = [(f"top cluster {top}: regions by similarity to the medoid",
             [(i, r, f"{run.keys[i]}\nsim {sim:.2f}") for i, r, sim in run.top_regions(top, run.config.top_regions)])]
    names = run.classnames
    with_feature = (cmap == top).any(axis=1)
    affected = score.affected_class()
    if affected is not None:
        idx = np.flatnonzero(with_feature & (run.y == affected))[:per_row]
        rows.append((f"'{names[affected]}' images with the feature (accuracy {score.gaps[affected].acc_in:.2f} with, "
                     f"{score.gaps[affected].acc_out:.2f} without)",
                     [(i, _first_region(cmap[i], top), f"pred {names[run.pred[i]]}") for i in idx]))
    for c in score.harmed_classes():
        idx = np.flatnonzero(with_feature & (run.y == c) & (run.pred != run.y))[:per_row]
        rows.append((f"misclassified '{names[c]}' images with the feature (accuracy {score.gaps[c].acc_in:.2f} with, "
                     f"{score.gaps[c].acc_out:.2f} without)",
                     [(i, _first_region(cmap[i], top), f"pred {names[run.pred[i]]}") for i in idx]))
    return rows


def _first_region(row: np.ndarray, cluster: int) -> int | None:
    hits = np.flatnonzero(row == cluster)
    return int(hits[0]) if len(hits) else None


def write_sheet(path: str, run: DiscoveryRun, samples: Mapping[str, SampleImage]) -> None:
    """A PNG: the top cluster's regions (first row), then whole images of the affected and harmed classes
    with the cluster's region outlined, so a person sees the feature and what it does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = sheet_rows(run)
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"RaVL: no cluster passed the filters on {run.split} (k = {run.result.clustering.k})",
                ha="center", va="center")
        fig.savefig(path, dpi=100, format="png")
        plt.close(fig)
        return
    n_cols = max(len(items) for _, items in rows) or 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.7 * n_cols, 2.1 * len(rows)), squeeze=False)
    for r, (title, items) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(items):
                continue
            i, region, caption = items[c]
            sample = samples[run.keys[i]]
            box = run.regions.boxes[i, region].tolist() if region is not None else None
            if r == 0:
                ax.imshow(sample.image.crop(tuple(box)), interpolation="nearest")
            else:
                ax.imshow(sample.image, interpolation="nearest")
                if box is not None:
                    x0, y0, x1, y1 = box
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=2))
            ax.set_title(caption, fontsize=6)
        axes[r][0].text(0.0, 1.32, title, transform=axes[r][0].transAxes, fontsize=8, ha="left", va="bottom")
    fig.suptitle(f"RaVL discovery: {run.split} split, regions {run.proposer_config}", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.55 / (2.1 * len(rows)), hspace=0.75, wspace=0.15)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# =========================================================================== the discover command


def add_discover_arguments(parser: argparse.ArgumentParser, command_ctx) -> None:
    """The ``discover`` subcommand: clip_benchmark's flag names, plus every plugin's flags (datasets, ``--ravl_*``)."""
    from ..plugins import add_plugin_flags
    parser.add_argument("--dataset", required=True, help="a group dataset: robust/<name> or wds/<name> with groups.json")
    parser.add_argument("--dataset_root", default="root", help="dataset root, clip_benchmark's templating ({dataset})")
    parser.add_argument("--model", required=True, help="open_clip model name (e.g. ViT-B-32, crp-tiny)")
    parser.add_argument("--pretrained", required=True, help="checkpoint tag or file")
    parser.add_argument("--model_type", default="open_clip", help="registered model type (default open_clip)")
    parser.add_argument("--model_cache_dir", default=None, help="where open_clip caches downloaded weights")
    parser.add_argument("--split", default="val", help="class-labelled split to analyse (default val)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="k-medoids seed (default 0)")
    parser.add_argument("--no_amp", action="store_false", dest="amp", default=True,
                        help="no mixed precision (on by default, as in clip_benchmark)")
    parser.add_argument("--feature_cache", default=None, metavar="DIR", help="feature cache directory")
    parser.add_argument("--no_feature_cache", action="store_true", help="do not read or write cached features")
    parser.add_argument("--output", default="ravl_discovery.json",
                        help="report JSON path; the PNG sheet goes beside it with the extension .png")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_plugin_flags(parser, command_ctx.plugin_manager)


def _run_discover_command(args: argparse.Namespace, command_ctx) -> int:
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    run_discover(args, command_ctx.registry)
    return 0


@hookimpl
def register_commands(register):
    from ..records import CommandSpec

    register(CommandSpec(
        "discover", "RaVL: find the image regions a model has learned to tie spuriously to a class (no group labels)",
        add_discover_arguments, _run_discover_command,
        description="Region-level discovery of learned spurious correlations (RaVL) on a class-labelled split; "
                    "writes a JSON report and a PNG sheet beside it.",
    ))


def sheet_path(report_path: str) -> str:
    base = report_path[: -len(".json")] if report_path.endswith(".json") else report_path
    return base + ".png"


def context_from_args(args: argparse.Namespace, registry) -> RunContext:
    """The run context of a ``discover`` command (dataset, model, extractor), like ``eval`` builds it."""
    from .. import engine

    for name, value in (("feature_cache", None), ("no_feature_cache", False), ("shard_pattern", None),
                        ("allow_pipe_urls", False), ("skip_bad_samples", False)):
        if not hasattr(args, name):
            setattr(args, name, value)
    args.verbose = not args.quiet
    dataset = engine.load_dataset(args, registry)
    if args.split not in dataset.splits():
        raise engine.EvalError(f"{args.dataset} has no split {args.split!r} (splits: {list(dataset.splits())})")
    return engine.build_context(args, registry, dataset, args.split)


def run_discover(args: argparse.Namespace, registry) -> dict[str, Any]:
    """``clip_benchmark_robust discover``: discovery, then the JSON report and PNG sheet, written atomically."""
    from .. import engine
    from ..atomic import write_files

    t0 = time.perf_counter()
    ctx = context_from_args(args, registry)
    proposer_name, proposer = make_proposer(args, registry)
    t_setup = time.perf_counter()  # dataset (generated on first use) and model loading
    try:
        run = discover(ctx, args.split, proposer_name, proposer, discovery_config(args),
                       truth_key=getattr(args, "ravl_truth_key", None) or "spurious_box")
    except ValueError as exc:
        if isinstance(exc, DatasetError):
            raise
        raise engine.EvalError(f"discover: {exc}") from None
    t_discovery = time.perf_counter()
    report = build_report(run, {"dataset": args.dataset, "model": args.model, "pretrained": args.pretrained,
                                "model_type": args.model_type})
    needed = {run.keys[i] for _, items in sheet_rows(run) for i, _, _ in items}
    samples = collect_samples(ctx, args.split, needed)
    report["seconds"]["setup"] = round(t_setup - t0, 3)
    report["seconds"]["discovery_total"] = round(t_discovery - t_setup, 3)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    png = sheet_path(args.output)
    write_files([
        (args.output, lambda tmp: _write_json(report, tmp)),
        (png, lambda tmp: write_sheet(tmp, run, samples)),
    ])
    print(format_summary(report, args.output, png))
    return report


def _write_json(report: Mapping[str, Any], path: str) -> None:
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)


def format_summary(report: Mapping[str, Any], json_path: str, png_path: str) -> str:
    """What ``discover`` prints: the chosen clustering, the top cluster, the checks."""
    lines = [f"RaVL discovery on {report['dataset']} [{report['split']}], {report['model']}/{report['pretrained']}: "
             f"{report['regions']['n_regions']} regions ({report['regions']['config']}) of "
             f"{report['regions']['n_images']} images, image accuracy {report['image_accuracy']:.3f}",
             f"k = {report['clustering']['k']} (silhouette {report['clustering']['silhouettes'][str(report['clustering']['k'])]:.3f}); "
             f"{len(report['ranked_clusters'])} cluster(s) kept"]
    top = report["top_cluster"]
    if top is None:
        lines.append("no cluster has H >= threshold and both a positive and a negative class gap")
    else:
        lines.append(f"top cluster {top['cluster']}: G = {top['performance_gap']:.3f}, H = {top['influence']:.3f}, "
                     f"affected class {top['affected_class']!r}, harmed {top['harmed_classes']}")
        entry = report["clusters"][top["cluster"]]
        for name, row in entry["per_class"].items():
            lines.append(f"  {name}: accuracy {row['acc_with']:.3f} with the feature ({row['n_with']}), "
                         f"{row['acc_without']:.3f} without ({row['n_without']})")
    if "precision@10" in report:
        v = report["validity"]
        lines.append(f"precision@10 = {report['precision@10']:.2f}; validity check: "
                     f"{'valid' if v['valid'] else 'NOT valid'} (gaps: favoured {v.get('favoured_class')!r} "
                     f"{v.get('favoured_gap', float('nan')):+.3f}, other classes {v.get('other_classes_gap', float('nan')):+.3f})")
    lines.append(f"discovery took {report['seconds']['discovery_total']:.1f} s; wrote {json_path} and {png_path}")
    return "\n".join(lines)


# =========================================================================== mitigation: losses


def parse_caption_labels(captions: Sequence[str], classnames: Sequence[str]) -> list[int]:
    """The class each caption names (the longest class name found as whole words; -1 if none or ambiguous)."""
    patterns = [(len(name), c, re.compile(rf"(?<!\w){re.escape(name.lower())}(?!\w)")) for c, name in enumerate(classnames)]
    labels = []
    for caption in captions:
        text = caption.lower()
        hits = sorted(((n, c) for n, c, p in patterns if p.search(text)), reverse=True)
        if not hits or (len(hits) > 1 and hits[0][0] == hits[1][0]):
            labels.append(-1)
        else:
            labels.append(hits[0][1])
    return labels


def clip_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric CLIP loss over a batch of (image, caption) pairs; same-class pairs are positives.

    ``image``/``text`` (B, D) normalised; ``labels`` (B,) (-1: only the own caption is positive).
    """
    logits = image @ text.T / tau
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    pos = same | torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    i2t = -(F.log_softmax(logits, dim=1) * pos).sum(1) / pos.sum(1)
    t2i = -(F.log_softmax(logits, dim=0) * pos).sum(0) / pos.sum(0)
    return 0.5 * (i2t.mean() + t2i.mean())


def region_to_label_loss(regions: torch.Tensor, usable: torch.Tensor, labels: torch.Tensor,
                         label_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """``L_R``: each usable (non-spurious) region is classified over the batch's labels towards its image's label.

    ``regions`` (B, R, D) normalised, ``usable`` (B, R) bool, ``labels`` (B,), ``label_emb`` (C, D).
    """
    present = torch.unique(labels[labels >= 0])
    mask = usable & (labels[:, None] >= 0)
    if len(present) == 0 or not mask.any():
        return regions.sum() * 0.0
    logits = regions[mask] @ label_emb[present].T / tau  # (n, |present|)
    target = torch.searchsorted(present, labels[:, None].expand_as(mask)[mask])
    return F.cross_entropy(logits, target)


def label_to_region_loss(regions: torch.Tensor, valid: torch.Tensor, spurious: torch.Tensor, labels: torch.Tensor,
                         label_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """``L_A``: per label in the batch, InfoNCE with its images' non-spurious regions as positives and every
    spurious region of the batch as negatives (so spurious regions move away from all labels)."""
    neg = (valid & spurious).flatten()
    if not neg.any():
        return regions.sum() * 0.0
    flat = regions.flatten(0, 1)
    losses = []
    for c in torch.unique(labels[labels >= 0]):
        pos = (valid & ~spurious & (labels[:, None] == c)).flatten()
        if not pos.any():
            continue
        sims = flat @ label_emb[c] / tau  # (B*R,)
        losses.append(torch.logsumexp(sims[pos | neg], 0) - torch.logsumexp(sims[pos], 0))
    return torch.stack(losses).mean() if losses else regions.sum() * 0.0


# =========================================================================== mitigation: the fit


@dataclass(frozen=True)
class FineTuneConfig:
    """Training settings shared by ``ravl`` and ``clip_ft`` (``--ravl_*`` flags)."""

    epochs: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.1
    batch_size: int = 64
    temperature: float = TEMPERATURE
    #: weight of the region terms: L = (1 - w) L_CLIP + w (L_R + L_A); 0.2 in the paper
    region_weight: float = 0.2
    shuffle_buffer: int = 256
    discovery_split: str = "val"
    #: how the loss embeds regions: tokens (pooled from the image's own forward, ViT), crops, or auto
    region_features: str = "auto"


REGION_FEATURES = ("auto", "tokens", "crops")


def token_regions_supported(model: torch.nn.Module) -> bool:
    """True for open_clip ViT towers whose patch tokens can be pooled into region embeddings.

    Needs ``output_tokens`` support, a projection, no attentional pooler and no patch dropout
    (which would drop tokens while training).
    """
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    return (isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None
            and isinstance(getattr(visual, "proj", None), torch.nn.Parameter)
            and isinstance(getattr(visual, "patch_dropout", None), torch.nn.Identity)
            and hasattr(visual, "output_tokens") and hasattr(visual, "patch_size"))


def region_feature_mode(requested: str, model: torch.nn.Module) -> str:
    """``tokens`` or ``crops`` for the fine-tuning loss (``auto``: tokens where the tower allows)."""
    if requested == "crops":
        return "crops"
    if token_regions_supported(model):
        return "tokens"
    if requested == "tokens":
        raise ValueError(f"--ravl_region_features tokens needs an open_clip ViT tower; this one is "
                         f"{type(getattr(model, 'visual', model)).__name__} (use auto or crops)")
    return "crops"


class TrainViews:
    """Sample transform for fine-tuning: the preprocessed image and, for RaVL, what its region terms need.

    ``crops``: the preprocessed region crops, stacked after the image.  ``tokens``: per region,
    the share of each ViT patch it covers in the *preprocessed* image, found by sending a white
    box on black through the same transform (so any resize/crop geometry is followed exactly).
    """

    wants_sample = True

    def __init__(self, transform: Callable, proposer: Callable | None, mode: str = "crops",
                 patch: tuple[int, int] = (1, 1)):
        self.transform = transform
        self.proposer = proposer
        self.mode = mode
        self.patch = patch

    def __call__(self, sample: SampleImage) -> dict[str, torch.Tensor]:
        image = self.transform(sample.image)
        if self.proposer is None:
            return {"views": image.unsqueeze(0)}
        boxes, valid = proposed_boxes(self.proposer, sample)
        if self.mode == "crops":
            views = [image] + [self.transform(sample.image.crop(b)) for b in boxes]
            return {"views": torch.stack(views), "valid": torch.tensor(valid)}
        size = sample.image.size
        black = self.transform(Image.new("RGB", size))[0]
        white = self.transform(Image.new("RGB", size, (255, 255, 255)))[0]
        cover = []
        for box in boxes:
            canvas = Image.new("RGB", size)
            canvas.paste((255, 255, 255), box)
            cover.append(((self.transform(canvas)[0] - black) / (white - black)).clamp(0, 1))
        weights = F.avg_pool2d(torch.stack(cover)[:, None], self.patch, self.patch)[:, 0]  # (R, gh, gw)
        valid = torch.tensor(valid) & (weights.flatten(1).sum(1) > 0)
        return {"views": image.unsqueeze(0), "valid": valid, "weights": weights}


def encode_with_token_regions(model: torch.nn.Module, images: torch.Tensor,
                              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings (B, D) and region embeddings (B, R, D) from one forward of an open_clip ViT.

    A region's embedding is the coverage-weighted mean of its patch tokens, passed through the
    tower's own head (``ln_post`` where the tower applies it after pooling, then ``proj``), the
    path the pooled token takes; ``weights`` is (B, R, gh, gw).
    """
    visual = model.visual
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = False
    w = weights.flatten(2).to(tokens.dtype)  # (B, R, gh*gw)
    regions = (w @ tokens) / w.sum(-1, keepdim=True).clamp_min(1e-6)  # (B, R, width)
    if getattr(visual, "final_ln_after_pool", False):
        regions = visual.ln_post(regions)
    return pooled, regions @ visual.proj


def shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """A seeded streaming shuffle: a random item of a ``buffer_size`` window leaves each time one enters."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def caption_table(ctx: RunContext, model: torch.nn.Module) -> tuple[list[list[str]], torch.Tensor]:
    """Per class the captions (templates filled with the class name) and their frozen text embeddings (n, D)."""
    templates = ctx.templates
    captions = [list(templates[name]) if isinstance(templates, Mapping) else [t.format(c=name) for t in templates]
                for name in ctx.classnames]
    flat = [c for per_class in captions for c in per_class]
    with torch.no_grad(), autocast(ctx.device, ctx.amp):
        emb = model.encode_text(ctx.tokenizer(flat).to(ctx.device))
    return captions, F.normalize(emb.float(), dim=-1)


class RegionAwareFineTune(Mitigation):
    """``ravl`` (region_aware=True) and ``clip_ft`` (the CLIP loss alone); see the module docstring."""

    def __init__(self, method: str, config: FineTuneConfig, discovery: DiscoveryConfig | None = None,
                 options: argparse.Namespace | None = None, model_type: str = "open_clip"):
        self.method = method
        self.region_aware = method == NAME
        self.config = config
        self.discovery_config = discovery or DiscoveryConfig()
        self.options = options or argparse.Namespace()
        self.model_type = model_type
        self.visual_state: dict[str, torch.Tensor] | None = None
        self._model: torch.nn.Module | None = None
        self._logits: dict[str, torch.Tensor] = {}
        self._info: dict[str, Any] = {}
        #: after a ravl fit (not saved): the discovery run and the (N_train, R) spurious-region mask
        self.discovery: DiscoveryRun | None = None
        self.train_spurious: dict[str, np.ndarray] | None = None

    # ---- fit

    def fit(self, ctx: RunContext) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        proposer = None
        if self.region_aware:
            proposer_name, proposer = make_proposer(self.options, ctx.registry)
            self.discovery = discover(ctx, cfg.discovery_split, proposer_name, proposer, self.discovery_config,
                                      truth_key=getattr(self.options, "ravl_truth_key", None) or "spurious_box")
            self.train_spurious = self._spurious_train_regions(ctx, proposer)
        t_discovery = time.perf_counter()

        model = copy.deepcopy(ctx.model).to(ctx.device)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.visual.parameters():
            p.requires_grad_(True)
        model.visual.train()
        mode, patch = "crops", (1, 1)
        if self.region_aware:
            mode = region_feature_mode(self.config.region_features, model)
            if mode == "tokens":
                ps = model.visual.patch_size
                patch = (ps, ps) if isinstance(ps, int) else tuple(ps)
        views_transform = TrainViews(ctx.transform, proposer, mode, patch)
        captions, caption_emb = caption_table(ctx, model)
        offsets = np.cumsum([0] + [len(c) for c in captions])
        flat_captions = [c for per_class in captions for c in per_class]
        label_emb = ctx.zeroshot_head().float().T.to(ctx.device)  # (C, D): the frozen class embeddings
        opt = torch.optim.AdamW([p for p in model.visual.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        gen = ctx.rng(f"{self.method}/train")
        use_amp = ctx.amp and torch.device(ctx.device).type == "cuda"
        history = []
        n_images = 0
        for epoch in range(cfg.epochs):
            stream = torch.utils.data.DataLoader(ctx.dataset.samples("train", views_transform),
                                                 batch_size=None, num_workers=ctx.extractor.num_workers)
            sums = {"loss": 0.0, "clip": 0.0, "region_to_label": 0.0, "label_to_region": 0.0, "steps": 0}
            bar = tqdm(desc=f"{self.method} epoch {epoch + 1}/{cfg.epochs}", unit="img", disable=not ctx.progress,
                       file=sys.stderr, leave=False)
            with bar:
                for batch in batched(shuffled(stream, cfg.shuffle_buffer, gen), cfg.batch_size):
                    keys = [item[0] for item in batch]
                    views = torch.stack([item[1]["views"] for item in batch]).to(ctx.device)
                    y_true = np.array([int(item[2][ctx.schema.class_index]) for item in batch])
                    # one caption per image: a template drawn at random, filled with the class name
                    picks = [offsets[c] + int(gen.integers(len(captions[c]))) for c in y_true]
                    batch_captions = [flat_captions[j] for j in picks]
                    labels = torch.tensor(parse_caption_labels(batch_captions, ctx.classnames), device=ctx.device)
                    with torch.autocast(torch.device(ctx.device).type, dtype=torch.bfloat16, enabled=use_amp):
                        if mode == "tokens":
                            weights = torch.stack([item[1]["weights"] for item in batch]).to(ctx.device)
                            image_emb, region_emb = encode_with_token_regions(model, views[:, 0], weights)
                        else:  # every view through the tower: the image, then its region crops
                            emb = model.encode_image(views.flatten(0, 1)).unflatten(0, views.shape[:2])
                            image_emb, region_emb = emb[:, 0], emb[:, 1:]
                    image_emb = F.normalize(image_emb.float(), dim=-1)
                    l_clip = clip_loss(image_emb, caption_emb[picks], labels, cfg.temperature)
                    loss = l_clip
                    if self.region_aware:
                        region_emb = F.normalize(region_emb.float(), dim=-1)
                        valid = torch.stack([item[1]["valid"] for item in batch]).to(ctx.device)
                        spurious = torch.from_numpy(np.stack([self.train_spurious[k] for k in keys])).to(ctx.device)
                        l_r = region_to_label_loss(region_emb, valid & ~spurious, labels, label_emb, cfg.temperature)
                        l_a = label_to_region_loss(region_emb, valid, spurious, labels, label_emb, cfg.temperature)
                        loss = (1 - cfg.region_weight) * l_clip + cfg.region_weight * (l_r + l_a)
                        sums["region_to_label"] += l_r.item()
                        sums["label_to_region"] += l_a.item()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sums["loss"] += loss.item()
                    sums["clip"] += l_clip.item()
                    sums["steps"] += 1
                    n_images += len(batch)
                    bar.update(len(batch))
            steps = max(sums.pop("steps"), 1)
            history.append({k: round(v / steps, 5) for k, v in sums.items()})
        t_end = time.perf_counter()
        self.visual_state = {k: v.detach().cpu().clone() for k, v in model.visual.state_dict().items()}
        self._model = None
        self._logits = {}
        info: dict[str, Any] = {
            "labels_used": ["class"],
            "trained": "model.visual (every parameter); text tower and logit scale frozen",
            "loss": ("(1 - w) L_CLIP + w (L_R + L_A)" if self.region_aware else "L_CLIP"),
            "losses_per_epoch": history,
            "train_images_seen": n_images,
            "seconds": {"discovery": round(t_discovery - t0, 3), "training": round(t_end - t_discovery, 3)},
        }
        if self.region_aware:
            n_spurious = int(sum(m.sum() for m in self.train_spurious.values()))
            info["discovery"] = self.discovery.summary()
            info["spurious_train_regions"] = n_spurious
            info["regions"] = proposer.config
            info["region_features_used"] = mode
            info["features_read"] = {self.config.discovery_split: ["image", f"regions[{proposer.config}]"],
                                     "train": [f"regions[{proposer.config}]"]}
        self._info = info

    def _spurious_train_regions(self, ctx: RunContext, proposer: Callable) -> dict[str, np.ndarray]:
        """Per train key, which regions are spurious: nearest medoid (cosine) is the top cluster's."""
        train = ctx.features("train", region_kind(proposer))
        top = self.discovery.result.top_cluster
        if top is None:
            warnings.warn(f"{self.method}: discovery kept no cluster, so no train region is spurious; "
                          "the region terms only align regions with their labels", stacklevel=3)
            return {k: np.zeros(train.features.shape[1], dtype=bool) for k in train.keys}
        medoids = torch.from_numpy(self.discovery.medoid_embeddings()).float()
        nearest = (F.normalize(train.features.float(), dim=-1) @ F.normalize(medoids, dim=-1).T).argmax(-1)
        mask = (nearest == top).numpy()
        return dict(zip(train.keys, mask))

    # ---- using the fitted model

    def _finetuned(self, ctx: RunContext) -> torch.nn.Module:
        if self.visual_state is None:
            raise RuntimeError(f"{self.method}: predict() before fit() or load_state_dict()")
        if self._model is None:
            self._model = apply_visual_state(copy.deepcopy(ctx.model), self.visual_state).to(ctx.device).eval()
        return self._model

    def predict(self, ctx: RunContext, split: str) -> torch.Tensor:
        if split not in self._logits:
            model = self._finetuned(ctx)
            extractor = FeatureExtractor(
                model, ctx.transform, model_type=ctx.extractor.model_type, model_name=ctx.extractor.model_name,
                pretrained=f"{ctx.extractor.pretrained_id}+{self.method}", device=ctx.device, amp=ctx.amp,
                batch_size=ctx.extractor.batch_size, num_workers=ctx.extractor.num_workers,
                cache=FeatureCache(None), progress=ctx.progress,  # a fitted model is not worth a cache entry
            )
            fs = extractor.extract(ctx.dataset, ctx.dataset_name, split, ["image"])["image"]
            if fs.keys != ctx.features(split).keys:
                raise DatasetError(f"{self.method}: split {split!r} was read in another order than its cached features")
            self._logits[split] = ctx.zeroshot_logits(fs.features)
        return self._logits[split]

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.visual_state is None:
            return {}
        return {f"visual.{k}": v for k, v in self.visual_state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        visual = {k[len("visual."):]: v.float() for k, v in state.items() if k.startswith("visual.")}
        if not visual or len(visual) != len(state):
            raise StateError(f"{self.method}: not a fine-tuned image tower (keys {sorted(state)[:4]} ...)")
        self.visual_state = visual
        self._model = None
        self._logits = {}
        self._info = {"loaded_from_state": True}

    def hyperparameters(self) -> dict[str, Any]:
        hp: dict[str, Any] = {"method": f"{self.method} ({'RaVL, ' + CITATION if self.region_aware else 'CLIP loss only'})",
                              "model_type": self.model_type, **asdict(self.config)}
        if self.region_aware:
            hp["discovery_config"] = asdict(self.discovery_config)
        else:
            for key in ("region_weight", "discovery_split", "region_features"):
                hp.pop(key)
        return {**hp, **self._info}

    def as_open_clip(self, ctx: RunContext) -> torch.nn.Module:
        """A copy of ``ctx.model`` with the fine-tuned image tower."""
        if self.visual_state is None:
            raise RuntimeError(f"{self.method}: as_open_clip() before fit() or load_state_dict()")
        return apply_visual_state(copy.deepcopy(ctx.model), self.visual_state)


def apply_visual_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load a fine-tuned image tower into ``model`` (in place); a mismatch is a StateError."""
    try:
        model.visual.load_state_dict({k: v.to(next(model.visual.parameters()).dtype) for k, v in state.items()})
    except RuntimeError as exc:
        raise StateError(f"the fine-tuned image tower does not fit this model: {str(exc).splitlines()[0]}") from None
    return model


def load_finetuned_model(method: str):
    """A model loader for ``--model_type ravl|clip_ft --model BASE --pretrained <output>_state_<method>.safetensors``."""

    def load(model_name: str, pretrained: str, cache_dir: str | None = None, device: str | torch.device = "cpu", *,
             registry=None):
        state, model, transform, tokenizer = load_base_model(pretrained, method, model_name, cache_dir, device, registry)
        fitted = RegionAwareFineTune(method, FineTuneConfig())
        fitted.load_state_dict(state.tensors)
        return apply_visual_state(model, fitted.visual_state).to(device).eval(), transform, tokenizer

    return load


# =========================================================================== registration


def _option(options: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(options, f"ravl_{name}", None)
    return default if value is None else value


def finetune_config(options: argparse.Namespace) -> FineTuneConfig:
    return config_from_options(FineTuneConfig, "ravl_", options, temperature=FineTuneConfig().temperature)


def discovery_config(options: argparse.Namespace) -> DiscoveryConfig:
    d = DiscoveryConfig()
    return DiscoveryConfig(
        influence_threshold=_option(options, "influence_threshold", d.influence_threshold),
        kmedoids_init=_option(options, "kmedoids_init", d.kmedoids_init),
        max_iter=_option(options, "kmedoids_max_iter", d.max_iter),
        top_regions=_option(options, "top_regions", d.top_regions),
    )


def _create(method: str):
    def create(options: argparse.Namespace) -> RegionAwareFineTune:
        return RegionAwareFineTune(method, finetune_config(options),
                                   discovery_config(options) if method == NAME else None, options,
                                   model_type=getattr(options, "model_type", None) or "open_clip")

    return create


@hookimpl
def add_arguments(parser):
    d, dd = FineTuneConfig(), DiscoveryConfig()
    parser.add_argument("--ravl_regions", default="quadrants",
                        help="ravl/discover: region proposer (quadrants, grid, boxes, or a plugin's; default quadrants)")
    parser.add_argument("--ravl_grid", type=at_least(1), default=3, help="ravl: N of the 'grid' proposer (N x N boxes)")
    parser.add_argument("--ravl_boxes_key", default="regions",
                        help="ravl: sample-json key holding the 'boxes' proposer's boxes (default regions)")
    parser.add_argument("--ravl_max_boxes", type=at_least(1), default=4,
                        help="ravl: boxes per image for the 'boxes' proposer (padded by repeating the last, default 4)")
    parser.add_argument("--ravl_truth_key", default="spurious_box",
                        help="discover: sample-json key of the labelled spurious box(es), for precision@10 and the "
                             "validity check only (default spurious_box)")
    parser.add_argument("--ravl_influence_threshold", type=fraction, default=dd.influence_threshold,
                        help=f"ravl: keep clusters with influence H >= this (default {dd.influence_threshold})")
    parser.add_argument("--ravl_kmedoids_init", choices=KMEDOIDS_INITS, default=dd.kmedoids_init,
                        help="ravl: FasterPAM initialisation: random (seeded by --seed) or the deterministic PAM build")
    parser.add_argument("--ravl_kmedoids_max_iter", type=at_least(1), default=dd.max_iter,
                        help=f"ravl: FasterPAM iteration cap (default {dd.max_iter})")
    parser.add_argument("--ravl_top_regions", type=at_least(1), default=dd.top_regions,
                        help=f"discover: regions of the top cluster listed and shown (default {dd.top_regions})")
    parser.add_argument("--ravl_discovery_split", default=d.discovery_split,
                        help=f"ravl: split the mitigation runs discovery on (class labels only; default {d.discovery_split})")
    parser.add_argument("--ravl_epochs", type=at_least(1), default=d.epochs,
                        help=f"ravl and clip_ft: fine-tuning epochs over train (default {d.epochs})")
    parser.add_argument("--ravl_lr", type=positive_float, default=d.lr, help=f"ravl and clip_ft: AdamW learning rate (default {d.lr:g})")
    parser.add_argument("--ravl_weight_decay", type=float, default=d.weight_decay,
                        help=f"ravl and clip_ft: AdamW weight decay (default {d.weight_decay:g})")
    parser.add_argument("--ravl_batch_size", type=at_least(2), default=d.batch_size,
                        help=f"ravl and clip_ft: images per step (default {d.batch_size})")
    parser.add_argument("--ravl_region_weight", type=fraction, default=d.region_weight,
                        help=f"ravl: w in (1 - w) L_CLIP + w (L_R + L_A) (default {d.region_weight}, the paper's)")
    parser.add_argument("--ravl_region_features", choices=REGION_FEATURES, default=d.region_features,
                        help="ravl: region embeddings in the fine-tuning loss: tokens (patch tokens of the image's own "
                             "forward, pooled per region; open_clip ViTs), crops (each region cropped and encoded), "
                             "auto (tokens where possible; default)")
    parser.add_argument("--ravl_shuffle_buffer", type=at_least(1), default=d.shuffle_buffer,
                        help=f"ravl and clip_ft: streaming shuffle window over train, in images (default {d.shuffle_buffer})")


@hookimpl
def register_region_proposers(register):
    register(RegionProposerSpec("quadrants", lambda options: GridProposer(2),
                                "the four quadrants of each image (RaVL's synthetic setting)"))
    register(RegionProposerSpec("grid", lambda options: GridProposer(_option(options, "grid", 3)),
                                "an N x N grid of equal boxes (--ravl_grid N)"))
    register(RegionProposerSpec(
        "boxes", lambda options: BoxesProposer(_option(options, "boxes_key", "regions"), _option(options, "max_boxes", 4)),
        "boxes from each sample's json (--ravl_boxes_key, padded to --ravl_max_boxes)"))


@hookimpl
def register_mitigations(register):
    register(MitigationSpec(
        name=NAME, create=_create(NAME),
        # what it reads is asked for lazily (val: image + region features; train: region features), since region
        # kinds depend on --ravl_regions and are not plain kind names; all of it is cached like any kind
        needs=Needs(fit_splits=("train", "val"), labels=frozenset({"class"}), feature_kinds=(), live_model=True),
        description="RaVL: region-level discovery of the learned spurious feature on val (class labels only), then "
                    "region-aware fine-tuning of the image tower on train image-caption pairs",
        citation=CITATION,
    ))
    register(MitigationSpec(
        name=BASELINE, create=_create(BASELINE),
        needs=Needs(fit_splits=("train",), labels=frozenset({"class"}), feature_kinds=(), live_model=True),
        description="plain fine-tuning of the image tower with the CLIP loss on train image-caption pairs "
                    "(RaVL's comparison; same --ravl_* training flags)",
        citation="",
    ))


@hookimpl
def register_model_loaders(register):
    for method in (NAME, BASELINE):
        register(ModelLoaderSpec(method, load_finetuned_model(method),
                                 f"a base open_clip model with the image tower fine-tuned by {method}: "
                                 f"--model BASE --pretrained <output>_state_{method}.safetensors", takes_registry=True))
