"""RaVL discovery at scale: exact and sampled (CLARA-style) clustering agree below the cap, the sampled
path never builds a matrix over all regions, and the report records how it clustered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_robust_plugins.datasets.spurious_quadrants import QuadrantsConfig, generate
from clip_robust_plugins.mitigations.ravl import clustering
from clip_robust_plugins.mitigations.ravl.clustering import (
    cluster_bounded,
    cluster_regions,
    cluster_regions_sampled,
    nearest_medoids,
)
from clip_robust_plugins.mitigations.ravl.configs import DiscoveryConfig
from clip_robust_plugins.mitigations.ravl.discovery import discover_from_embeddings

QSMALL = dict(train_size=64, val_size=64, test_size=32)


def groups(n_per: int = 60, n_groups: int = 5, dim: int = 16, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.eye(n_groups, dim)
    return np.concatenate([c + rng.normal(0, 0.05, (n_per, dim)) for c in centres]).astype(np.float32)


def test_bounded_is_the_exact_path_at_and_below_the_cap():
    emb = groups()
    exact = cluster_regions(emb, [4, 5, 6], seed=3)
    for cap in (len(emb), len(emb) + 1):
        bounded = cluster_bounded(emb, [4, 5, 6], seed=3, max_regions=cap, draws=3)
        assert not bounded.sampled and bounded.sample_size is None
        assert np.array_equal(bounded.labels, exact.labels) and np.array_equal(bounded.medoids, exact.medoids)
        assert bounded.silhouettes == exact.silhouettes
    # the whole discovery too: a cap at the number of regions changes nothing
    emb4 = emb.reshape(75, 4, 16)
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 2, 75), rng.integers(0, 2, 75)
    scores = rng.random((75, 4, 2))
    valid = np.ones((75, 4), dtype=bool)
    a = discover_from_embeddings(emb4, valid, y, pred, scores, 2, DiscoveryConfig(), seed=0)
    b = discover_from_embeddings(emb4, valid, y, pred, scores, 2, DiscoveryConfig(max_cluster_regions=300), seed=0)
    assert np.array_equal(a.clustering.labels, b.clustering.labels) and a.ranking == b.ranking
    assert [s.performance_gap for s in a.scores] == [s.performance_gap for s in b.scores]


def test_sampled_path_above_the_cap_finds_the_groups_without_a_full_matrix(monkeypatch):
    emb = groups()  # 300 regions in 5 tight groups
    sizes = []
    real = clustering.cosine_distances
    monkeypatch.setattr(clustering, "cosine_distances", lambda x: sizes.append(len(x)) or real(x))
    result = cluster_bounded(emb, [4, 5, 6], seed=7, max_regions=50, draws=2)
    assert sizes and max(sizes) == 50  # only sample matrices, never (300 x 300)
    assert result.sampled and (result.sample_size, result.draws, result.seed) == (50, 2, 7)
    assert result.k == 5 == max(result.silhouettes, key=result.silhouettes.get)
    assert len(result.labels) == 300 and result.medoids.max() < 300
    # every planted group is one cluster, and each region's label is its nearest medoid
    for g in range(5):
        assert len(np.unique(result.labels[g * 60:(g + 1) * 60])) == 1
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert np.array_equal(result.labels, (unit @ unit[result.medoids].T).argmax(1))
    # deterministic under the seed; another seed draws another sample
    again = cluster_regions_sampled(emb, [4, 5, 6], seed=7, sample_size=50, draws=2)
    assert np.array_equal(again.labels, result.labels) and np.array_equal(again.medoids, result.medoids)


def test_nearest_medoids_in_chunks_matches_one_block():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(1000, 8)).astype(np.float32)
    medoids = emb[[3, 500, 900]] / np.linalg.norm(emb[[3, 500, 900]], axis=1, keepdims=True)
    a = nearest_medoids(emb, medoids, chunk=7)
    b = nearest_medoids(emb, medoids, chunk=5000)
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])
    assert a[0][[3, 500, 900]].tolist() == [0, 1, 2] and np.allclose(a[1][[3, 500, 900]], 0, atol=1e-6)


def test_discover_report_records_the_sample(run_cli, tmp_path):
    root = tmp_path / "data"
    generate(root, QuadrantsConfig(**QSMALL), progress=False)
    flags = ["--dataset", "robust/spurious_quadrants", "--dataset_root", root,
             *[x for k, v in QSMALL.items() for x in (f"--quadrants_{k}", str(v))],
             "--model", "crp-tiny", "--pretrained", "spurious_quadrants", "--num_workers", "0", "--no_amp", "--quiet",
             "--feature_cache", tmp_path / "cache"]
    out = tmp_path / "sampled.json"
    rc, _, err = run_cli("discover", *flags, "--ravl_max_cluster_regions", "100", "--ravl_cluster_draws", "2",
                         "--seed", "5", "--output", out)
    assert rc == 0, err
    c = json.loads(out.read_text())["clustering"]
    assert c["mode"] == "sampled" and c["sample_size"] == 100 and c["draws"] == 2 and c["sample_seed"] == 5
    assert c["max_cluster_regions"] == 100 and c["k"] in c["k_tried"]
    rc, _, err = run_cli("discover", *flags, "--output", tmp_path / "exact.json")
    assert rc == 0, err
    exact = json.loads((tmp_path / "exact.json").read_text())["clustering"]
    assert exact["mode"] == "exact" and "sample_size" not in exact and exact["max_cluster_regions"] == 10_000


@pytest.mark.parametrize("flag", ["--ravl_max_cluster_regions", "--ravl_cluster_draws"])
def test_cap_flags_are_validated(run_cli, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        run_cli("discover", "--dataset", "robust/spurious_quadrants", "--model", "crp-tiny",
                "--pretrained", "spurious_quadrants", flag, "0")
    assert exc.value.code == 2 and f"argument {flag}: must be at least" in capsys.readouterr().err
