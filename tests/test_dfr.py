"""DFR (Deep Feature Reweighting): the protocol, the fitted head and the plugin wiring.

Most tests run on synthetic embeddings through a tiny stand-in for the engine's
RunContext (it reuses RunContext.rng, so seeding is the real derivation).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import clip_robust_plugins
from clip_robust_plugins.features import FeatureSet
from clip_robust_plugins.groups import two_field_schema
from clip_robust_plugins.mitigations import dfr
from clip_robust_plugins.mitigations.base import RunContext
from clip_robust_plugins.mitigations.dfr import DFR, DFRTrain, group_balanced_subsample
from clip_robust_plugins.plugins import PluginError

TINY_CHECKPOINT = Path(clip_robust_plugins.__file__).parent / "assets" / "crp-tiny_spurious_shapes.safetensors"


class FakeContext:
    """The part of RunContext that DFR uses, over in-memory FeatureSets."""

    rng = RunContext.rng  # the real seed + salt derivation

    def __init__(self, splits: dict[str, FeatureSet], seed: int = 0, eval_split: str = "test"):
        self._splits = splits
        self.seed = seed
        self.eval_split = eval_split
        self.schema = next(iter(splits.values())).schema
        self.classnames = list(self.schema.classnames)
        self.options = argparse.Namespace()

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def features(self, split: str, kind: str = "image") -> FeatureSet:
        return self._splits[split]


def make_split(rng: np.random.Generator, counts, n_attr: int = 2, dim: int = 8, core_sd: float = 1.0,
               spur_sd: float = 0.2, prefix: str = "s") -> FeatureSet:
    """Embeddings with one core dimension (class) and one spurious dimension (attribute).

    ``counts[g]`` samples of group ``g = y * n_attr + a``; dim 0 = class signal (mean
    -1/+1 for 2 classes), dim 1 = attribute signal (far less noisy), the rest noise.
    """
    n_classes = len(counts) // n_attr
    schema = two_field_schema([f"c{i}" for i in range(n_classes)], [f"a{i}" for i in range(n_attr)])
    ys, as_ = [], []
    for g, n in enumerate(counts):
        ys += [g // n_attr] * n
        as_ += [g % n_attr] * n
    y, a = np.array(ys, dtype=np.int64), np.array(as_, dtype=np.int64)
    x = rng.normal(size=(len(y), dim))
    x[:, 0] = (2 * y / max(1, n_classes - 1) - 1) + core_sd * rng.normal(size=len(y))
    if n_classes > 2:  # one extra core dimension per class for one-vs-rest
        x[:, 2:2 + n_classes] = np.eye(n_classes)[y] * 2 + core_sd * rng.normal(size=(len(y), n_classes))
    x[:, 1] = (2 * a / max(1, n_attr - 1) - 1) + spur_sd * rng.normal(size=len(y))
    keys = tuple(f"{prefix}{i:05d}" for i in range(len(y)))
    fields = torch.from_numpy(np.stack([y, a], axis=1))
    return FeatureSet(keys, torch.from_numpy(x).float(), fields, schema)


TRAIN_COUNTS = (950, 50, 50, 950)  # 95% of each class on "its" attribute value
VAL_COUNTS = (100, 100, 100, 100)
TEST_COUNTS = (250, 250, 250, 250)


@pytest.fixture(scope="module")
def spurious():
    rng = np.random.default_rng(1234)
    return {
        "train": make_split(rng, TRAIN_COUNTS, prefix="tr"),
        "val": make_split(rng, VAL_COUNTS, prefix="va"),
        "test": make_split(rng, TEST_COUNTS, prefix="te"),
    }


def group_counts(fs: FeatureSet, idx: np.ndarray) -> np.ndarray:
    return np.bincount(fs.group_ids().numpy()[idx], minlength=fs.schema.n_groups())


def wga(pred: np.ndarray, fs: FeatureSet) -> float:
    g, y = fs.group_ids().numpy(), fs.y.numpy()
    return min((pred[g == k] == y[g == k]).mean() for k in np.unique(g))


# ------------------------------------------------------------------- subsampling
def test_group_balanced_subsample_skips_empty_groups_and_is_seeded():
    groups = np.array([0] * 5 + [2] * 3 + [3] * 7)  # group 1 empty
    idx = group_balanced_subsample(groups, np.random.default_rng(0))
    assert np.array_equal(np.bincount(groups[idx], minlength=4), [3, 0, 3, 3])
    assert len(set(idx.tolist())) == idx.size and np.all(np.diff(idx) > 0)
    again = group_balanced_subsample(groups, np.random.default_rng(0))
    other = group_balanced_subsample(groups, np.random.default_rng(1))
    assert np.array_equal(idx, again) and not np.array_equal(idx, other)


def test_tuning_and_every_final_subsample_are_exactly_group_balanced():
    val = make_split(np.random.default_rng(0), (41, 30, 17, 25))
    ctx = FakeContext({"val": val})
    m = DFR(n_fits=5)
    m.fit(ctx)
    g = val.group_ids().numpy()
    halves_tune = np.setdiff1d(np.arange(len(val)), m.selection_indices)
    # tuning half: per group n - n//2 of the group; balanced to its smallest group (17 - 8 = 9)
    assert np.array_equal(np.bincount(g[halves_tune], minlength=4), [21, 15, 9, 13])
    assert np.array_equal(group_counts(val, m.tuning_indices), [9, 9, 9, 9])
    assert np.isin(m.tuning_indices, halves_tune).all()
    # final fits: each a fresh balanced subsample of the whole val split (smallest group: 17)
    assert len(m.final_indices) == 5
    for idx in m.final_indices:
        assert np.array_equal(group_counts(val, idx), [17, 17, 17, 17])
        assert len(set(idx.tolist())) == idx.size
    assert len({tuple(idx) for idx in m.final_indices}) == 5  # fresh each time
    hp = m.hyperparameters()
    assert (hp["tuning_size"], hp["tuning_group_size"]) == (36, 9)
    assert (hp["final_subsample_size"], hp["final_group_size"], hp["n_fits"]) == (68, 17, 5)


# ------------------------------------------------------------------ C selection
def test_c_is_selected_on_the_held_out_half_only(spurious, monkeypatch):
    val = spurious["val"]
    calls, scored = [], []
    real_select, real_wga = dfr.select_c, dfr.worst_group_accuracy

    def spy_select(*args, **kwargs):
        calls.append((args, kwargs))
        return real_select(*args, **kwargs)

    def spy_wga(pred, y, groups):
        scored.append((np.array(y), np.array(groups)))
        return real_wga(pred, y, groups)

    monkeypatch.setattr(dfr, "select_c", spy_select)
    monkeypatch.setattr(dfr, "worst_group_accuracy", spy_wga)
    m = DFR(n_fits=2)
    m.fit(FakeContext(spurious))
    tune, sel = m.tuning_indices, m.selection_indices
    assert np.intersect1d(tune, sel).size == 0
    # the halves partition val, group by group (100 per group -> 50 / 50)
    assert np.array_equal(group_counts(val, sel), [50, 50, 50, 50])
    assert np.array_equal(group_counts(val, np.setdiff1d(np.arange(len(val)), sel)), [50, 50, 50, 50])

    (args, kwargs), = calls
    x_tune, y_tune, x_sel, y_sel, g_sel, grid, n_classes = args
    x, y, g = val.features.numpy().astype(np.float64), val.y.numpy(), val.group_ids().numpy()
    scaler = StandardScaler().fit(x[tune])  # fitted on the balanced tuning data
    assert np.allclose(x_tune, scaler.transform(x[tune])) and np.array_equal(y_tune, y[tune])
    assert np.allclose(x_sel, scaler.transform(x[sel]))
    assert np.array_equal(y_sel, y[sel]) and np.array_equal(g_sel, g[sel])
    # every score computed during selection saw exactly the held-out rows
    assert len(scored) == len(dfr.DEFAULT_C_GRID)
    for y_scored, g_scored in scored:
        assert np.array_equal(y_scored, y[sel]) and np.array_equal(g_scored, g[sel])

    # recompute each C's held-out worst-group accuracy with plain scikit-learn
    recorded = m.hyperparameters()["selection_worst_group_acc"]
    for entry, c in zip(recorded, dfr.DEFAULT_C_GRID, strict=True):
        clf = LogisticRegression(C=c, solver="liblinear", random_state=kwargs["random_state"], **dfr.l1_kwargs())
        clf.fit(scaler.transform(x[tune]), y[tune])
        pred = clf.predict(scaler.transform(x[sel]))
        expected = min((pred[g[sel] == k] == y[sel][g[sel] == k]).mean() for k in range(4))
        assert entry == {"C": c, "worst_group_acc": expected}
    best = max(recorded, key=lambda e: e["worst_group_acc"])  # first best in grid order
    assert m.C == best["C"]


def test_dfr_train_retrains_on_train_and_selects_on_val(spurious, monkeypatch):
    calls = []
    real_select = dfr.select_c
    monkeypatch.setattr(dfr, "select_c", lambda *a, **k: calls.append(a) or real_select(*a, **k))
    m = DFRTrain()
    m.fit(FakeContext(spurious))
    train, val = spurious["train"], spurious["val"]
    assert np.array_equal(group_counts(train, m.tuning_indices), [50, 50, 50, 50])
    assert len(m.final_indices) == 10  # the authors' default for DFR^Tr_Tr
    for idx in m.final_indices:
        assert np.array_equal(group_counts(train, idx), [50, 50, 50, 50])
    (args,) = calls
    scaler = StandardScaler().fit(train.features.numpy().astype(np.float64))  # all of train
    assert np.allclose(args[2], scaler.transform(val.features.numpy().astype(np.float64)))
    assert np.array_equal(args[3], val.y.numpy())
    assert m.hyperparameters()["selection_size"] == len(val)


# ------------------------------------------------------------------ determinism
def test_same_seed_same_head_other_seed_other_subsamples(spurious):
    # unbalanced val, so that the final subsamples are proper subsets of it
    splits = {"val": make_split(np.random.default_rng(9), (60, 30, 25, 50))}
    a, b, c = DFR(n_fits=4), DFR(n_fits=4), DFR(n_fits=4)
    a.fit(FakeContext(splits, seed=7))
    b.fit(FakeContext(splits, seed=7))
    c.fit(FakeContext(splits, seed=8))
    assert torch.equal(a.coef, b.coef) and torch.equal(a.intercept, b.intercept)
    assert np.array_equal(a.tuning_indices, b.tuning_indices)
    assert a.hyperparameters() == b.hyperparameters()
    assert not np.array_equal(a.selection_indices, c.selection_indices)
    assert not np.array_equal(a.tuning_indices, c.tuning_indices)
    assert all(not np.array_equal(x, y) for x, y in zip(a.final_indices, c.final_indices, strict=True))
    assert a.hyperparameters()["subsample_digest"] != c.hyperparameters()["subsample_digest"]
    assert not torch.equal(a.coef, c.coef)
    # the two variants draw from different salts
    t = DFRTrain(n_fits=1)
    t.fit(FakeContext(spurious, seed=7))
    assert t.hyperparameters()["rng_salts"][0].startswith("dfr_train/")


# ------------------------------------------------------------------ it works
def test_dfr_fixes_a_spurious_correlation_that_erm_learns(spurious):
    train, test = spurious["train"], spurious["test"]
    erm = LogisticRegression(max_iter=1000).fit(train.features.numpy(), train.y.numpy())
    erm_wga = wga(erm.predict(test.features.numpy()), test)
    ctx = FakeContext(spurious)
    results = {}
    for variant in (DFR, DFRTrain):
        m = variant()
        m.fit(ctx)
        logits = m.predict(ctx, "test")
        assert logits.shape == (len(test), 2) and logits.dtype == torch.float32
        results[m.name] = wga(logits.argmax(1).numpy(), test)
    # ERM leans on the (95%-correlated, nearly noise-free) attribute dimension
    assert erm_wga < 0.5, erm_wga
    assert results["dfr"] > 0.75 and results["dfr"] > erm_wga + 0.3, (results, erm_wga)
    assert results["dfr_train"] > 0.75 and results["dfr_train"] > erm_wga + 0.3, (results, erm_wga)


def test_three_classes_one_vs_rest(monkeypatch):
    rng = np.random.default_rng(3)
    splits = {"val": make_split(rng, (40, 30) * 3), "test": make_split(rng, (50, 50) * 3)}
    m = DFR(n_fits=3)
    m.fit(FakeContext(splits))
    logits = m.predict(FakeContext(splits), "test")
    assert logits.shape == (300, 3) and m.coef.shape == (3, 8)
    assert (logits.argmax(1) == splits["test"].y).float().mean() > 0.8


# ------------------------------------------------------------------ state
def test_state_dict_roundtrip_and_json_hyperparameters(spurious, tmp_path):
    ctx = FakeContext(spurious)
    m = DFR(n_fits=3)
    m.fit(ctx)
    logits = m.predict(ctx, "test")
    state = m.state_dict()
    assert set(state) == {"scaler_mean", "scaler_scale", "coef", "intercept", "C"}
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and state["C"].ndim == 0
    save_file(state, str(tmp_path / "dfr.safetensors"))
    restored = DFR()
    restored.load_state_dict(load_file(str(tmp_path / "dfr.safetensors")))
    assert torch.equal(restored.predict(ctx, "test"), logits)
    assert restored.C == m.C
    # two-class logits: the argmax is the binary decision w.z + b > 0
    diff = logits[:, 1] - logits[:, 0]
    assert torch.equal(logits.argmax(1), (diff > 0).long())
    hp = m.hyperparameters()
    text = json.dumps(hp, allow_nan=False)
    assert json.loads(text)["C"] == m.C and hp["c_grid"] == list(dfr.DEFAULT_C_GRID)
    assert hp["variant"] == "DFR^Val_Tr" and hp["seed"] == 0 and len(hp["selection_worst_group_acc"]) == 7
    with pytest.raises(RuntimeError, match="before fit"):
        DFR().predict(ctx, "test")
    with pytest.raises(ValueError, match="expected"):
        DFR().load_state_dict({"coef": state["coef"]})


# ------------------------------------------------------------------ scikit-learn
def test_no_warnings_from_scikit_learn_and_the_penalty_really_is_l1(spurious):
    ctx = FakeContext(spurious)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any FutureWarning/DeprecationWarning (or other) fails
        for variant in (DFR, DFRTrain):
            m = variant(c_grid=(0.01,), n_fits=2)
            m.fit(ctx)
    # with strong L1 the pure-noise dimensions are exactly zero (an L2 fit would not be)
    assert m.C == 0.01
    assert (m.coef[:, 2:] == 0).float().mean() > 0.5


# ------------------------------------------------------------------ edge cases
def test_empty_group_is_skipped_with_a_warning_and_missing_class_is_an_error():
    rng = np.random.default_rng(5)
    val = make_split(rng, (30, 0, 20, 25))
    m = DFR(n_fits=2)
    with pytest.warns(UserWarning, match=r"y:c0_a:a1.*no samples in split 'val'"):
        m.fit(FakeContext({"val": val}))
    assert m.hyperparameters()["empty_groups"] == ["y:c0_a:a1"]
    for idx in m.final_indices:
        assert np.array_equal(group_counts(val, idx), [20, 0, 20, 20])
    no_class = make_split(rng, (30, 20, 0, 0))
    with pytest.raises(ValueError, match=r"\['c1'\].*split 'val'"):
        DFR().fit(FakeContext({"val": no_class}))


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="C grid"):
        DFR(c_grid=(1.0, -0.1))
    with pytest.raises(ValueError, match="n_fits"):
        DFR(n_fits=0)
    with pytest.raises(TypeError, match="variant"):
        DFR(variant="dfr_train")  # the variants are classes (DFR, DFRTrain), not a setting


# ------------------------------------------------------------------ plugin wiring
def test_registered_through_the_hooks_with_flags():
    from clip_robust_plugins.argtypes import spec_config
    from clip_robust_plugins.plugins import add_spec_flags, build_plugin_manager, collect_registry

    pm = build_plugin_manager(["clip_robust_plugins.mitigations.dfr"], trace=False)
    registry = collect_registry(pm)
    val, train = registry.mitigation("dfr"), registry.mitigation("dfr_train")
    assert val.needs.fit_splits == ("val",) and train.needs.fit_splits == ("train", "val")
    assert val.needs.labels == train.needs.labels == frozenset({"class", "group"})
    assert val.options is train.options is dfr.DFRConfig and val.option_prefix == train.option_prefix == "dfr_"
    parser = argparse.ArgumentParser()
    add_spec_flags(parser, registry, kinds=("mitigations",))  # the shared --dfr_* flags, declared once
    dfr_flags = [a.dest for a in parser._actions if a.dest.startswith("dfr_")]
    assert sorted(dfr_flags) == ["dfr_c_grid", "dfr_max_iter", "dfr_n_fits"]
    defaults = parser.parse_args([])
    assert defaults.dfr_c_grid is None and defaults.dfr_n_fits is None  # flags default to None: the config decides

    def create(spec, options):
        return spec.create(spec_config(spec, options))

    assert create(val, defaults).c_grid == dfr.DEFAULT_C_GRID and create(val, defaults).max_iter == dfr.DEFAULT_MAX_ITER
    assert create(val, defaults).n_fits == 20 and create(train, defaults).n_fits == 10
    opts = parser.parse_args(["--dfr_c_grid", "0.5", "0.05", "--dfr_n_fits", "3", "--dfr_max_iter", "50"])
    made = create(val, opts)
    assert (made.c_grid, made.n_fits, made.max_iter) == ((0.5, 0.05), 3, 50)
    assert isinstance(made, DFR) and isinstance(create(train, opts), DFRTrain)
    with pytest.raises(PluginError, match="dfr_c_grid"):  # flags never added: an error, not silent defaults
        create(train, argparse.Namespace())
    with pytest.raises(SystemExit):  # a bad value is argparse's one-line error naming the flag
        parser.parse_args(["--dfr_n_fits", "0"])


def test_registration_imports_neither_torch_nor_sklearn():
    import subprocess
    import sys

    code = ("import sys; import clip_robust_plugins.mitigations.dfr as d; d.DFRConfig(); "
            "print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ end to end
@pytest.mark.skipif(not TINY_CHECKPOINT.is_file(), reason=f"shipped tiny checkpoint not built yet: {TINY_CHECKPOINT}")
def test_end_to_end_through_the_cli(run_cli, shapes_flags, tmp_path):
    out = tmp_path / "res.json"
    rc, stdout, _ = run_cli(
        "eval", *shapes_flags, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--num_workers", "0",
        "--mitigation", "dfr", "--dfr_n_fits", "5",
        "--feature_cache", tmp_path / "cache", "--output", out,
    )
    assert rc == 0 and "dfr" in stdout
    dump = json.loads(out.read_text())
    info = dump["robust"]["methods"]["dfr"]
    assert info["needs"]["labels"] == ["class", "group"]
    hp = info["hyperparameters"]
    assert hp["C"] in dfr.DEFAULT_C_GRID and hp["n_fits"] == 5 and hp["retrain_split"] == "val"
    metrics = dump["metrics"]
    assert 0.0 <= metrics["dfr/worst_group_acc"] <= 1.0
    print(f"zeroshot WGA {metrics['zeroshot/worst_group_acc']:.3f}, dfr WGA {metrics['dfr/worst_group_acc']:.3f}")
