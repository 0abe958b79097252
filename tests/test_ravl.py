"""RaVL: region proposers, the discovery scores on hand-made cases, the discover command, the mitigations.

The scoring tests build tiny arrays whose cluster scores are worked out by hand in the
comments; the end-to-end tests run the CLI on a small generated ``robust/spurious_quadrants``
with the shipped ``crp-tiny``/``spurious_quadrants`` checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_robust_plugins.datasets.base import DatasetError, SampleImage
from clip_robust_plugins.datasets.spurious_quadrants import QuadrantsConfig, iter_split, quadrant_boxes
from clip_robust_plugins.mitigations import ravl
from clip_robust_plugins.mitigations.ravl import (
    BoxesProposer,
    ClassGap,
    DiscoveryConfig,
    GridProposer,
    class_gaps,
    clip_loss,
    cluster_regions,
    cosine_distances,
    discover_from_embeddings,
    influence_score,
    k_candidates,
    label_to_region_loss,
    parse_caption_labels,
    precision_at_k,
    proposed_boxes,
    region_to_label_loss,
    top_regions_for_prediction,
    validity_check,
)
from conftest import QSMALL

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one torch thread is far faster



def sample(w: int, h: int, **meta) -> SampleImage:
    return SampleImage("k0", Image.new("RGB", (w, h)), meta)


# ----------------------------------------------------------------------------- region proposers


def test_quadrants_and_grid_boxes():
    assert GridProposer(2)(sample(64, 64)) == [(0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 64), (32, 32, 64, 64)]
    assert GridProposer(2)(sample(64, 64)) == [tuple(b) for b in quadrant_boxes(64)]  # the dataset's region order
    boxes = GridProposer(2)(sample(7, 5))
    assert boxes == [(0, 0, 4, 2), (4, 0, 7, 2), (0, 2, 4, 5), (4, 2, 7, 5)]  # round(3.5) = 4, round(2.5) = 2
    grid = GridProposer(3)(sample(10, 10))
    assert len(grid) == 9 and grid[0] == (0, 0, 3, 3) and grid[4] == (3, 3, 7, 7) and grid[8] == (7, 7, 10, 10)
    # the grid tiles the image exactly
    cover = np.zeros((10, 10), dtype=int)
    for x0, y0, x1, y1 in grid:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert GridProposer(3).count == 9 and GridProposer(3).config == "grid3"


def test_a_region_is_labelled_when_it_is_half_covered_or_holds_half_the_feature():
    from clip_robust_plugins.mitigations.ravl.split_discovery import region_is_labelled

    quadrants = [(0, 0, 24, 24), (24, 0, 48, 24), (0, 24, 24, 48), (24, 24, 48, 48)]
    full_patch = [(24, 0, 48, 24)]  # spurious_quadrants: the patch is a whole quadrant
    assert [region_is_labelled(q, full_patch) for q in quadrants] == [False, True, False, False]
    marker = [(3, 28, 13, 38)]  # clipworld: a 10 px marker inside the bottom-left quadrant (17% of it)
    assert [region_is_labelled(q, marker) for q in quadrants] == [False, False, True, False]
    straddling = [(19, 28, 29, 38)]  # half in each bottom quadrant
    assert [region_is_labelled(q, straddling) for q in quadrants] == [False, False, True, True]
    corner = [(20, 20, 30, 30)]  # a corner in each: 16% or 36% of the box, at most 7% of a region
    assert not any(region_is_labelled(q, corner) for q in quadrants)
    assert not region_is_labelled(quadrants[0], [])


def test_dataset_boxes_are_padded_truncated_and_checked():
    proposer = BoxesProposer("regions", 3)
    s = sample(20, 20, regions=[[0, 0, 10, 10], [10, 10, 20, 20]])
    boxes, valid = proposed_boxes(proposer, s)
    assert boxes == [(0, 0, 10, 10), (10, 10, 20, 20), (10, 10, 20, 20)] and valid == [True, True, False]
    assert proposer(sample(20, 20, regions=[1, 2, 5, 6])) == [(1, 2, 5, 6)] * 3  # a single box
    assert BoxesProposer("regions", 1)(s) == [(0, 0, 10, 10)]  # truncated
    with pytest.raises(DatasetError, match="'k0'.*no 'regions' boxes"):
        proposer(sample(20, 20))
    with pytest.raises(DatasetError, match="not a box"):
        proposer(sample(20, 20, regions="everywhere"))
    with pytest.raises(DatasetError, match="outside the 20x20 image"):
        proposed_boxes(proposer, sample(20, 20, regions=[[0, 0, 30, 10]]))


# ----------------------------------------------------------------------------- scores on hand-made cases


def test_class_gaps_and_influence_by_hand():
    # 8 images, 2 regions each; classes 0 (images 0-3) and 1 (images 4-7)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    # the cluster ("feature") is region 1 of images 0, 1, 4, 5
    in_cluster = np.zeros((8, 2), dtype=bool)
    in_cluster[[0, 1, 4, 5], 1] = True
    gaps = class_gaps(in_cluster.any(1), y, pred)
    # class 0: with the feature images 0, 1 (both wrong): 0.0; without: 2, 3 (both right): 1.0; w = 2*2/4 = 1
    # class 1: with: 4, 5 (right): 1.0; without: 6, 7 (wrong): 0.0
    assert gaps == {0: ClassGap(2, 0.0, 2, 1.0), 1: ClassGap(2, 1.0, 2, 0.0)}
    assert gaps[0].gap == -1.0 and gaps[1].gap == 1.0 and gaps[0].weight == 1.0
    # unequal sizes: weight 2 * min / total
    assert ClassGap(1, 1.0, 3, 0.0).weight == pytest.approx(0.5) and ClassGap(1, 1.0, 3, 0.0).gap == pytest.approx(0.5)

    # region scores for (class 0, class 1): image 0's top region for its prediction (1) is region 1,
    # image 1's is region 0
    scores = np.zeros((8, 2, 2))
    scores[:, :, 0] = 0.5
    scores[:, :, 1] = 0.5
    scores[0, 1, 1], scores[1, 0, 1] = 0.9, 0.9
    valid = np.ones((8, 2), dtype=bool)
    top = top_regions_for_prediction(scores, valid, pred)
    assert top[0] == 1 and top[1] == 0
    # misclassified images with the feature of the negative-gap class 0: images 0 and 1; only image 0's
    # top region lies in the cluster -> H = 1/2
    assert influence_score(in_cluster, top, y, pred, gaps) == pytest.approx(0.5)
    # an image with one valid region has no top region
    valid[0, 0] = False
    assert top_regions_for_prediction(scores, valid, pred)[0] == -1
    assert influence_score(in_cluster, top_regions_for_prediction(scores, valid, pred), y, pred, gaps) == 0.0
    # no misclassified image of a negative-gap class: undefined
    assert influence_score(in_cluster, top, y, y, class_gaps(in_cluster.any(1), y, y)) is None


def _toy_embeddings():
    """Three tight, mutually orthogonal groups of regions: A (a 'patch'), B (an 'object'), C ('empty').

    12 images, 2 regions each.  Region 0 of images 0-5 is A, region 0 of images 6-11 is B and
    every region 1 is C.  Classes: images 0-2 and 6-8 are class 0, the others class 1.
    """
    rng = np.random.default_rng(0)
    basis = np.eye(3, 8)
    emb = np.zeros((12, 2, 8))
    emb[:6, 0] = basis[0]
    emb[6:, 0] = basis[1]
    emb[:, 1] = basis[2]
    emb += rng.normal(0, 0.01, emb.shape)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    y = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    return emb, y


def test_discovery_filters_and_ranks_clusters_by_hand():
    emb, y = _toy_embeddings()
    # the model: class-0 images with A are read as 1 (2 of 3), class-1 images without A are read as 0 (1 of 3)
    pred = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1])
    scores = np.full((12, 2, 2), 0.5)
    scores[:6, 0, 1] = 0.9  # A regions score high for class 1 ...
    scores[:6, 0, 0] = 0.1
    scores[6:, 1, 0] = 0.8  # ... C regions of the B images high for class 0
    valid = np.ones((12, 2), dtype=bool)
    config = DiscoveryConfig()
    result = discover_from_embeddings(emb, valid, y, pred, scores, n_classes=1, config=config, seed=0)
    # n_classes=1 -> K in 2..4; three orthogonal groups -> K = 3 has the best silhouette
    assert sorted(result.clustering.silhouettes) == [2, 3, 4] and result.clustering.k == 3
    cmap = result.cluster_map((12, 2))
    a, b, c = cmap[0, 0], cmap[6, 0], cmap[0, 1]
    assert len({a, b, c}) == 3 and (cmap[:6, 0] == a).all() and (cmap[6:, 0] == b).all() and (cmap[:, 1] == c).all()
    s = {k: result.scores[v] for k, v in (("A", a), ("B", b), ("C", c))}
    # A: class 0 with A (imgs 0-2) acc 1/3, without (6-8) 1 -> gap -2/3; class 1 with (3-5) 1, without (9-11) 2/3 -> +1/3
    assert s["A"].gaps[0].gap == pytest.approx(-2 / 3) and s["A"].gaps[1].gap == pytest.approx(1 / 3)
    assert s["A"].performance_gap == pytest.approx(1.0) and s["A"].spurious_pattern
    # H_A: misclassified class-0 images with A are 0 and 1; their top region for class 1 is region 0 (in A) -> 1
    assert s["A"].influence == pytest.approx(1.0) and s["A"].kept
    assert s["A"].affected_class() == 1 and s["A"].harmed_classes() == [0]
    # B is the mirror image (same |gaps|, G = 1), but the top region of the misclassified class-1 image 9 for
    # its prediction (class 0) is region 1 (C), not B -> H_B = 0: dropped
    assert s["B"].performance_gap == pytest.approx(1.0) and s["B"].spurious_pattern
    assert s["B"].influence == 0.0 and not s["B"].kept
    # C is in every image: no class has images without it, no gaps, not a spurious pattern
    assert s["C"].gaps == {} and s["C"].performance_gap == 0.0 and not s["C"].spurious_pattern and not s["C"].kept
    assert result.ranking == [a] and result.top_cluster == a
    # regions ranked by similarity to the medoid: the medoid first, then decreasing
    ranked = result.ranked_regions[a]
    assert len(ranked) == 6 and result.similarity[ranked[0]] == pytest.approx(1.0)
    assert np.all(np.diff(result.similarity[ranked]) <= 1e-12)
    # with a higher influence threshold nothing is kept
    strict = discover_from_embeddings(emb, valid, y, pred, scores, 1, dataclasses.replace(config, influence_threshold=1.01), 0)
    assert strict.ranking == [] and strict.top_cluster is None


def test_ranking_is_by_performance_gap():
    emb, _ = _toy_embeddings()
    emb[6:9, 0], emb[9:, 0] = emb[6, 0], emb[9, 1]  # B now only in images 6-8; images 9-11 have C twice
    y = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0])
    pred = np.array([0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    scores = np.full((12, 2, 2), 0.5)
    scores[:9, 0, :] = 0.9  # A and B regions are every image's top region for any prediction
    valid = np.ones((12, 2), dtype=bool)
    result = discover_from_embeddings(emb, valid, y, pred, scores, 1, DiscoveryConfig(), 0)
    cmap = result.cluster_map((12, 2))
    a, b = cmap[0, 0], cmap[6, 0]
    sa, sb = result.scores[a], result.scores[b]
    # A: class 0 with (0-2) 1/3, without (6, 7, 11) 2/3, w = 1 -> -1/3; class 1 with (3-5) 1, without (8-10) 2/3 -> +1/3
    assert sa.performance_gap == pytest.approx(2 / 3)
    # B: class 0 with (6, 7) 1, without (0-2, 11) 1/4, w = 2/3 -> +1/2; class 1 with (8) 0, without 1, w = 1/3 -> -1/3
    assert sb.gaps[0].gap == pytest.approx(0.5) and sb.gaps[1].gap == pytest.approx(-1 / 3)
    assert sb.performance_gap == pytest.approx(5 / 6)
    # both explain their errors (H = 1): kept, and ranked by G
    assert sa.influence == sb.influence == 1.0 and sa.kept and sb.kept
    assert result.ranking == [b, a]


def test_k_sweep_is_2y_to_5y_minus_1_and_silhouette_picks_k():
    from sklearn.metrics import silhouette_score

    assert k_candidates(2, 10_000) == [4, 5, 6, 7, 8, 9]
    assert k_candidates(10, 10_000) == list(range(20, 50))
    assert k_candidates(3, 9) == [6, 7, 8]  # K must stay below the number of regions
    rng = np.random.default_rng(1)
    centres = np.eye(5, 16)
    emb = np.concatenate([c + rng.normal(0, 0.05, (30, 16)) for c in centres])
    clustering = cluster_regions(emb, k_candidates(2, len(emb)), seed=0)
    assert sorted(clustering.silhouettes) == [4, 5, 6, 7, 8, 9]
    assert clustering.k == 5 == max(clustering.silhouettes, key=clustering.silhouettes.get)
    # the silhouette is the usual one on the precomputed cosine distances (scikit-learn agrees)
    dist = cosine_distances(emb)
    assert clustering.silhouettes[5] == pytest.approx(silhouette_score(dist, clustering.labels, metric="precomputed"), abs=1e-5)
    assert np.allclose(np.diag(dist), 0) and dist.min() >= 0 and dist.max() <= 1


def test_clustering_is_deterministic_under_a_seed():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(120, 8))
    a = cluster_regions(emb, [4, 5, 6], seed=3)
    b = cluster_regions(emb, [4, 5, 6], seed=3)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.medoids, b.medoids) and a.silhouettes == b.silhouettes
    build = cluster_regions(emb, [4, 5, 6], seed=0, init="build")
    assert np.array_equal(build.labels, cluster_regions(emb, [4, 5, 6], seed=0, init="build").labels)


def test_precision_at_k_and_validity_check():
    truth = np.array([1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0])
    assert precision_at_k(np.arange(12), truth, 10) == pytest.approx(0.8)
    assert precision_at_k(np.array([0, 2]), truth, 10) == 1.0  # fewer than k: of those listed
    assert precision_at_k(np.array([], dtype=int), truth) == 0.0
    y = np.array([0] * 4 + [1] * 4)
    present = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    pred = np.array([1, 1, 0, 0, 1, 1, 0, 1])  # class 0: 0.0 with, 1.0 without; class 1: 1.0 with, 0.5 without
    v = validity_check(pred, y, present, ["square", "diamond"])
    assert v["valid"] and v["favoured_class"] == "diamond"
    assert v["favoured_gap"] == pytest.approx(0.5) and v["other_classes_gap"] == pytest.approx(-1.0)
    assert not validity_check(y, y, present, ["square", "diamond"])["valid"]  # a perfect model learned nothing


# ----------------------------------------------------------------------------- losses and captions


def test_caption_labels_are_parsed_from_the_text():
    names = ["bird", "water bird", "square"]
    caps = ["a photo of a water bird.", "A BIRD on land", "a square shape.", "nothing here", "birdhouse"]
    assert parse_caption_labels(caps, names) == [1, 0, 2, -1, -1]


def test_losses_pull_and_push_the_right_way():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1])
    label_emb = F.normalize(torch.randn(2, 8, generator=gen), dim=-1)
    aligned = label_emb[labels]
    other = label_emb[1 - labels]
    assert clip_loss(aligned, aligned, labels, 0.07) < clip_loss(other, aligned, labels, 0.07)
    # L_R: a non-spurious region at its label beats one at the other label; spurious regions do not count
    regions = torch.stack([aligned, other], 1)  # (4, 2, 8)
    usable = torch.tensor([[True, False]] * 4)
    good = region_to_label_loss(regions, usable, labels, label_emb, 0.07)
    bad = region_to_label_loss(regions.flip(1), usable, labels, label_emb, 0.07)
    assert good < bad
    # L_A: spurious regions sitting on a label cost more than spurious regions far from every label
    valid = torch.ones(4, 2, dtype=torch.bool)
    spurious = torch.tensor([[False, True]] * 4)
    near = torch.stack([aligned, aligned], 1)
    far = torch.stack([aligned, -label_emb.mean(0, keepdim=True).expand(4, 8)], 1)
    assert label_to_region_loss(far, valid, spurious, labels, label_emb, 0.07) < label_to_region_loss(
        near, valid, spurious, labels, label_emb, 0.07)
    # ... and its gradient moves a spurious region away from the labels
    x = near.clone().requires_grad_(True)
    label_to_region_loss(x, valid, spurious, labels, label_emb, 0.07).backward()
    assert (x.grad[:, 1] * aligned).sum(-1).gt(0).all()  # descent direction -grad points away
    assert label_to_region_loss(near, valid, torch.zeros_like(spurious), labels, label_emb, 0.07) == 0.0


# ----------------------------------------------------------------------------- the dataset


def test_spurious_quadrants_region_labels_and_counts(quadrants_root):
    cfg = QuadrantsConfig(**QSMALL)
    a = list(iter_split(cfg, "train"))
    b = list(iter_split(cfg, "train"))
    assert [np.asarray(s[1]).tobytes() for s in a] == [np.asarray(s[1]).tobytes() for s in b]
    counts = np.zeros(4, dtype=int)
    for _key, _image, values, extra, mask in a:
        counts[values["y"] * 2 + values["a"]] += 1
        q = extra["spurious_quadrant"]
        assert (q >= 0) == bool(values["a"]) and q != extra["object_quadrant"]
        assert extra["spurious_box"] == (extra["regions"][q] if q >= 0 else None)
        x0, y0, x1, y1 = extra["box"]
        ox0, oy0, ox1, oy1 = extra["regions"][extra["object_quadrant"]]
        assert ox0 <= x0 < x1 <= ox1 and oy0 <= y0 < y1 <= oy1  # the object lies in its quadrant
        assert np.asarray(mask).max() == 255
    assert counts.tolist() == cfg.group_counts("train").tolist() == [30, 2, 2, 30]  # patch predicts diamond
    assert cfg.group_counts("val").tolist() == [16] * 4


# ----------------------------------------------------------------------------- the discover command


def test_discover_writes_report_and_sheet_and_finds_the_patch(run_cli, quadrants_flags, tmp_path):
    out = tmp_path / "report" / "disc.json"
    rc, stdout, err = run_cli("discover", *quadrants_flags, "--feature_cache", tmp_path / "cache", "--output", out,
                              "--quiet")
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert (tmp_path / "report" / "disc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["format"] == ravl.REPORT_FORMAT and report["split"] == "val" and report["labels_used"] == ["class"]
    assert report["regions"] == {"proposer": "quadrants", "config": "grid2", "per_image": 4, "n_images": 64,
                                 "n_regions": 256}
    assert report["clustering"]["k_tried"] == [4, 5, 6, 7, 8, 9]
    assert report["clustering"]["k"] in report["clustering"]["k_tried"]
    top = report["top_cluster"]
    assert top is not None and report["ranked_clusters"][0] == top["cluster"]
    kept = [c for c in report["clusters"] if c["kept"]]
    assert all(c["influence"] >= 0.25 for c in kept)
    assert [c["cluster"] for c in sorted(kept, key=lambda c: -c["performance_gap"])] == report["ranked_clusters"]
    # the shipped model learned "patch => diamond": discovery finds the patch regions
    assert top["affected_class"] == "diamond" and top["harmed_classes"] == ["square"]
    assert report["precision@10"] >= 0.9
    assert len(top["top_regions"]) == 10 and all(r["key"].startswith("quadrants_val_") for r in top["top_regions"])
    entry = report["clusters"][top["cluster"]]
    assert entry["per_class"]["diamond"]["gap"] > 0 > entry["per_class"]["square"]["gap"]
    assert set(report["validity"]) >= {"valid", "favoured_class", "favoured_gap", "other_classes_gap"}
    assert "precision@10 =" in stdout and "top cluster" in stdout and report["seconds"]["discovery_total"] > 0


def test_discovery_reads_no_group_labels(quadrants_flags, tmp_path, monkeypatch):
    """Scrambling the spurious-attribute field (and so every group id) changes nothing in discovery."""
    from clip_robust_plugins import cli, plugins
    from clip_robust_plugins.argtypes import config_from_options

    pm = plugins.build_plugin_manager()
    registry = plugins.collect_registry(pm)
    parser = cli.build_parser(pm, registry, "discover")
    args = parser.parse_args(["discover", *quadrants_flags, "--no_feature_cache", "--quiet"])
    config = config_from_options(ravl.DiscoverConfig, "", args)
    ctx = ravl.discover_context(config, cli.command_context(args, pm, registry), "cpu")
    name, proposer = ravl.proposer_for(ctx, config.regions.regions)
    first = ravl.discover(ctx, "val", name, proposer)
    image = ctx.features("val")
    fields = image.fields.clone()
    fields[:, 1] = torch.from_numpy(np.random.default_rng(0).permutation(fields[:, 1].numpy()))
    assert not torch.equal(fields, image.fields)
    ctx._features[("val", "image")] = dataclasses.replace(image, fields=fields)
    monkeypatch.setattr(type(image), "group_ids", lambda *a, **k: pytest.fail("group ids were read"))
    second = ravl.discover(ctx, "val", name, proposer)
    assert np.array_equal(first.result.clustering.labels, second.result.clustering.labels)
    assert first.result.ranking == second.result.ranking
    assert [s.influence for s in first.result.scores] == [s.influence for s in second.result.scores]


def test_discover_bad_input_is_one_line(run_cli, quadrants_flags, tmp_path):
    cases = [
        (["--split", "holdout"], "has no split 'holdout'"),
        (["--ravl_regions", "nope"], "unknown region proposer 'nope'"),
        (["--ravl_regions", "boxes", "--ravl_boxes_key", "missing_key"], "no 'missing_key' boxes"),
    ]
    for extra, message in cases:
        out = tmp_path / "bad.json"
        rc, stdout, err = run_cli("discover", *quadrants_flags, "--no_feature_cache", "--quiet", "--output", out, *extra)
        assert rc == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_third_party_region_proposer(run_cli, quadrants_flags, tmp_path, monkeypatch):
    (tmp_path / "crp_halves_plugin.py").write_text(textwrap.dedent('''
        from clip_robust_plugins import RegionProposerSpec, hookimpl

        class Halves:
            count = 2
            config = "halves"

            def __call__(self, sample):
                w, h = sample.image.size
                return [(0, 0, w // 2, h), (w // 2, 0, w, h)]

        @hookimpl
        def register_region_proposers(register):
            register(RegionProposerSpec("halves", lambda options: Halves(), "left and right halves"))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "halves.json"
    rc, _, err = run_cli("discover", *quadrants_flags, "--plugin", "crp_halves_plugin", "--ravl_regions", "halves",
                         "--no_feature_cache", "--quiet", "--output", out)
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["regions"]["proposer"] == "halves" and report["regions"]["n_regions"] == 2 * 64
    assert report["clustering"]["k_tried"] == [4, 5, 6, 7, 8, 9]
    # the same dataset's own boxes (the quadrants, in the json) give the quadrant proposer's regions
    rc, _, err = run_cli("discover", *quadrants_flags, "--ravl_regions", "boxes", "--no_feature_cache", "--quiet",
                         "--output", tmp_path / "boxes.json")
    assert rc == 0, err
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    assert boxes["regions"]["n_regions"] == 256 and boxes["precision@10"] is not None


# ----------------------------------------------------------------------------- the mitigations


def test_ravl_and_clip_ft_end_to_end_with_state_roundtrip(run_cli, quadrants_flags, tmp_path):
    common = [*quadrants_flags, "--feature_cache", tmp_path / "cache", "--ravl_epochs", "1", "--ravl_lr", "1e-4",
              "--ravl_batch_size", "16"]
    rc, stdout, err = run_cli("eval", *common, "--mitigation", "ravl", "clip_ft", "--save_mitigation_state",
                              "--save_predictions", "--output", tmp_path / "fit.json")
    assert rc == 0, err
    first = json.loads((tmp_path / "fit.json").read_text())
    methods = first["robust"]["methods"]
    for name in ("ravl", "clip_ft"):
        info = methods[name]
        assert info["needs"]["labels"] == ["class"] and info["hyperparameters"]["labels_used"] == ["class"]
        assert info["hyperparameters"]["train_images_seen"] == QSMALL["train_size"]
    # ravl: train's classes (fine-tuning captions) and val's (discovery); clip_ft: train's only
    assert methods["ravl"]["labels_used"] == {"labels": "class", "splits": {"train": "class", "val": "class"}}
    assert methods["clip_ft"]["labels_used"] == {"labels": "class", "splits": {"train": "class"}}
    hp = methods["ravl"]["hyperparameters"]
    assert hp["discovery"]["split"] == "val" and hp["spurious_train_regions"] > 0
    assert set(hp["losses_per_epoch"][0]) == {"loss", "clip", "region_to_label", "label_to_region"}
    assert "region_weight" not in methods["clip_ft"]["hyperparameters"]
    state_file = tmp_path / "fit_state_ravl.safetensors"
    assert state_file.is_file() and (tmp_path / "fit_state_clip_ft.safetensors").is_file()
    from clip_robust_plugins.states import read_state

    state = read_state(str(state_file))
    assert state.method == "ravl" and all(k.startswith("visual.") for k in state.tensors)
    from clip_robust_plugins.models import load_open_clip

    model = load_open_clip("crp-tiny", "spurious_quadrants")[0]
    assert any(not torch.equal(v.float(), model.visual.state_dict()[k[len("visual."):]].float())
               for k, v in state.tensors.items())  # fine-tuning changed the image tower

    # reload both states: no fit, identical predictions
    rc, _, err = run_cli("eval", *common, "--mitigation", "ravl", "clip_ft", "--mitigation_state", state_file,
                         tmp_path / "fit_state_clip_ft.safetensors", "--save_predictions", "--output", tmp_path / "re.json")
    assert rc == 0, err
    assert (tmp_path / "fit_predictions.csv").read_text() == (tmp_path / "re_predictions.csv").read_text()

    # the fitted model as a clip_benchmark model type
    rc, _, err = run_cli("eval", "--dataset", "wds/spurious_quadrants", "--dataset_root", quadrants_flags[3],
                         "--model_type", "ravl", "--model", "crp-tiny", "--pretrained", state_file, "--num_workers", "0",
                         "--no_amp", "--feature_cache", tmp_path / "cache2", "--save_predictions",
                         "--output", tmp_path / "as_model.json")
    assert rc == 0, err
    fit_rows = list(csv.DictReader(open(tmp_path / "fit_predictions.csv")))
    model_rows = list(csv.DictReader(open(tmp_path / "as_model_predictions.csv")))
    assert [(r["key"], r["pred_ravl"]) for r in fit_rows] == [(r["key"], r["pred_zeroshot"]) for r in model_rows]
    rc, _, err = run_cli("eval", "--dataset", "wds/spurious_quadrants", "--dataset_root", quadrants_flags[3],
                         "--model_type", "clip_ft", "--model", "crp-tiny", "--pretrained", state_file,
                         "--num_workers", "0", "--output", tmp_path / "wrong.json")
    assert rc == 2 and "not 'clip_ft'" in err


def test_as_open_clip_has_the_fitted_image_tower_and_the_original_text_tower():
    from clip_robust_plugins.models import load_open_clip

    model = load_open_clip("crp-tiny", "spurious_quadrants")[0].eval()
    state = {k: v + 0.01 for k, v in model.visual.state_dict().items()}
    method = ravl.RegionAwareFineTune("ravl", ravl.FineTuneConfig())
    method.load_state_dict({f"visual.{k}": v for k, v in state.items()})
    adapted = method.as_open_clip(argparse.Namespace(model=model))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(adapted.encode_image(images), model.encode_image(images))
        tokens = torch.zeros(1, 16, dtype=torch.long)
        assert torch.equal(adapted.encode_text(tokens), model.encode_text(tokens))
    assert torch.equal(adapted.visual.state_dict()["proj"], state["proj"])
    with pytest.raises(ravl.StateError, match="not a fine-tuned image tower"):
        method.load_state_dict({"head.proj": torch.zeros(2)})


def test_token_region_embeddings_follow_the_preprocessing_and_the_towers_head():
    from clip_robust_plugins.models import load_open_clip

    model, transform, _ = load_open_clip("crp-tiny", "spurious_quadrants")
    model.eval()
    assert ravl.token_regions_supported(model) and ravl.region_feature_mode("auto", model) == "tokens"
    views = ravl.TrainViews(transform, GridProposer(2), "tokens", model.visual.patch_size)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = views(SampleImage("k", image, {}))
    w = out["weights"]  # (4 regions, 8 x 8 patches): 64 px -> 32 px input, 4 px patches
    assert w.shape == (4, 8, 8) and out["valid"].all()
    assert w[0, :3, :3].min() > 0.95 and w[0, 5:, :].max() == 0 and w[0, :, 5:].max() == 0  # top-left quadrant
    assert torch.allclose(w.sum(0), torch.ones(8, 8), atol=0.05)  # the quadrants tile the input
    x = out["views"]
    with torch.no_grad():
        pooled, regions = ravl.encode_with_token_regions(model, x, w[None])
        torch.testing.assert_close(pooled, model.encode_image(x))
        model.visual.output_tokens = True
        _, tokens = model.visual(x)
        model.visual.output_tokens = False
        manual = (w[0].flatten() @ tokens[0]) / w[0].sum() @ model.visual.proj
        torch.testing.assert_close(regions[0, 0], manual)
    assert not model.visual.output_tokens
    resnet = argparse.Namespace(visual=torch.nn.Linear(2, 2))
    assert ravl.region_feature_mode("auto", resnet) == "masked" and ravl.region_feature_mode("crops", resnet) == "crops"
    with pytest.raises(ValueError, match="needs an open_clip ViT"):
        ravl.region_feature_mode("tokens", resnet)


def test_ravl_fits_with_crop_regions_too(quadrants_flags):
    """The crop-and-encode region path of the loss (towers without patch tokens, or --ravl_region_features crops)."""
    from test_ravl_mitigation import _context, _create

    ctx, registry, args = _context(quadrants_flags, "--ravl_region_features", "crops", "--ravl_batch_size", "32",
                                   "--ravl_lr", "1e-4")
    method = _create(registry, "ravl", args)
    method.fit(ctx)
    hp = method.hyperparameters()
    assert hp["region_features_used"] == "crops" and hp["train_images_seen"] == QSMALL["train_size"]
    assert hp["losses_per_epoch"][0]["label_to_region"] > 0
    logits = method.predict(ctx, "test")
    assert logits.shape == (QSMALL["test_size"], 2) and torch.isfinite(logits).all()
