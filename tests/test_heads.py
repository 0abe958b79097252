"""The linear-head base and the robust heads, each against an independent computation on a small case.

Synthetic embeddings through a tiny stand-in for the engine's RunContext (it reuses
RunContext.rng, so seeding is the real derivation).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from clip_robust_plugins import LinearHead, Needs
from clip_robust_plugins.features import FeatureSet
from clip_robust_plugins.groups import two_field_schema
from clip_robust_plugins.metrics import worst_group_accuracy
from clip_robust_plugins.mitigations import dfr as dfr_labelfree
from clip_robust_plugins.mitigations.base import RunContext
from clip_robust_plugins.mitigations.erm_head import ERMHead
from clip_robust_plugins.mitigations.heads import afr, class_balanced, group_dro, jtt
from clip_robust_plugins.mitigations.heads.solver import fit_softmax
from clip_robust_plugins.mitigations.linear_head import NEVER, class_rows


class NoGroups(FeatureSet):
    """A split whose group labels must not be read."""

    def group_ids(self, grouping="default"):
        raise AssertionError(f"group labels of {self.keys[0][:2]!r} read")


class FakeContext:
    rng = RunContext.rng

    def __init__(self, splits, seed=0, eval_split="test"):
        self._splits, self.seed, self.eval_split = splits, seed, eval_split
        self.schema = next(iter(splits.values())).schema
        self.classnames = list(self.schema.classnames)

    @property
    def n_classes(self):
        return len(self.classnames)

    def features(self, split, kind="image"):
        return self._splits[split]


def make_split(rng, counts, n_attr=2, dim=6, prefix="s", cls=FeatureSet):
    """``counts[g]`` samples of group ``g = y * n_attr + a``: dim 0 noisy class signal, dim 1 clean attribute."""
    n_classes = len(counts) // n_attr
    schema = two_field_schema([f"c{i}" for i in range(n_classes)], [f"a{i}" for i in range(n_attr)])
    y = np.repeat(np.arange(len(counts)) // n_attr, counts)
    a = np.repeat(np.arange(len(counts)) % n_attr, counts)
    x = rng.normal(size=(len(y), dim))
    x[:, 0] += 1.2 * (2 * y / max(1, n_classes - 1) - 1)
    x[:, 1] = 2 * a - 1 + 0.2 * rng.normal(size=len(y))
    if n_classes > 2:
        x[:, 2:2 + n_classes] += 1.5 * np.eye(n_classes)[y]
    keys = tuple(f"{prefix}{i:05d}" for i in range(len(y)))
    return cls(keys, torch.from_numpy(x).float(), torch.from_numpy(np.stack([y, a], 1)), schema)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(7)
    return {
        "train": make_split(rng, (380, 20, 20, 380), prefix="tr"),
        "val": make_split(rng, (40, 40, 40, 40), prefix="va"),
        "test": make_split(rng, (50, 50, 50, 50), prefix="te"),
    }


def standardized(fs, scaler=None):
    x = fs.features.numpy().astype(np.float32)
    scaler = scaler or StandardScaler().fit(x)
    return scaler.transform(x), scaler


# ----------------------------------------------------------------- the base
def test_class_rows_binary_full_subset_and_unseen_classes():
    w, b = np.array([[2.0, -4.0]]), np.array([1.0])
    coef, intercept = class_rows(w, b, [0, 1], 2)
    assert np.array_equal(coef, [[-1.0, 2.0], [1.0, -2.0]]) and np.array_equal(intercept, [-0.5, 0.5])
    # binary rows of classes 1 and 3 of four: the others are never predicted
    coef, intercept = class_rows(w, b, [1, 3], 4)
    assert np.array_equal(coef[[0, 2]], np.zeros((2, 2))) and intercept[0] == intercept[2] == NEVER
    assert np.array_equal(coef[3], [1.0, -2.0]) and np.array_equal(coef[1], [-1.0, 2.0])
    rows = np.arange(6.0).reshape(3, 2)
    coef, intercept = class_rows(rows, [1.0, 2.0, 3.0], [0, 2, 3], 4)
    assert np.array_equal(coef[[0, 2, 3]], rows) and intercept[1] == NEVER
    coef, intercept = class_rows(np.ones((4, 2)), np.zeros(4), [0, 1, 2], 4)  # full rows: the absent class still never wins
    assert intercept[3] == NEVER and np.array_equal(coef[3], [0.0, 0.0])
    with pytest.raises(ValueError, match="returned 2 rows for 4 classes"):
        class_rows(np.ones((2, 2)), np.zeros(2), [0, 1, 2], 4, "mine")


def test_erm_head_never_predicts_a_class_absent_from_train():
    rng = np.random.default_rng(0)
    train = make_split(rng, (30, 30, 0, 0, 30, 30), prefix="tr")  # class c1 absent
    test = make_split(rng, (10,) * 6, prefix="te")
    ctx = FakeContext({"train": train, "test": test})
    head = ERMHead()
    head.fit(ctx)
    logits = head.predict(ctx, "test")
    assert logits.shape == (60, 3) and not (logits.argmax(1) == 1).any()
    assert float(head.intercept[1]) == NEVER and torch.isfinite(logits).all()
    # the two present classes: exactly sklearn's multinomial fit
    x, y = train.features.numpy(), train.y.numpy()
    keep = y != 1
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=int(ctx.rng("erm_head").integers(2**31 - 1)))
    clf.fit(x[keep], y[keep])
    assert np.allclose(head.coef.numpy()[[0, 2]], clf.coef_ if clf.coef_.shape[0] == 2 else
                       np.stack([-clf.coef_[0] / 2, clf.coef_[0] / 2]))


def test_state_errors_are_one_line_and_name_the_method(world):
    ctx = FakeContext(world)
    head = jtt.JTTHead(lambda_up=(5.0,), stage1_l2=(1.0,))
    head.fit(ctx)
    state = head.state_dict()
    assert set(state) == {"coef", "intercept", "scaler_mean", "scaler_scale", "lambda_up_chosen", "stage1_l2_chosen"}
    restored = jtt.JTTHead()
    restored.load_state_dict(state)
    assert torch.equal(restored.predict(ctx, "test"), head.predict(ctx, "test"))
    assert restored.hyperparameters()["lambda_up_chosen"] == 5.0
    for bad, match in [
        ({k: v for k, v in state.items() if k != "scaler_mean"}, r"^jtt_head: state has tensors .* expected"),
        ({**state, "coef": state["coef"][:, :3]}, r"^jtt_head: inconsistent state shapes"),
        ({"coef": state["coef"], "intercept": state["intercept"]}, "another method"),  # e.g. erm_head's
    ]:
        with pytest.raises(ValueError, match=match) as info:
            jtt.JTTHead().load_state_dict(bad)
        assert "\n" not in str(info.value)
    other_dim = {"train": world["train"], "test": make_split(np.random.default_rng(1), (3, 3, 3, 3), dim=9)}
    with pytest.raises(ValueError, match="takes 6-dim features, split 'test' has 9"):
        restored.predict(FakeContext(other_dim), "test")
    with pytest.raises(RuntimeError, match="before fit"):
        jtt.JTTHead().predict(ctx, "test")


def test_a_single_class_fit_split_is_a_clear_error():
    one = make_split(np.random.default_rng(2), (20, 20, 0, 0))
    with pytest.raises(ValueError, match=r"class_balanced_head: split 'train' has samples of \['c0'\] only"):
        class_balanced.ClassBalancedHead().fit(FakeContext({"train": one}))


def test_a_subclass_must_declare_name_and_fit_split():
    class Nameless(LinearHead):
        needs = Needs()

    with pytest.raises(TypeError, match="declares a name and needs.fit_splits"):
        Nameless.spec()


# ------------------------------------------------------------ fit_softmax
def test_fit_softmax_is_sklearns_weighted_multinomial_fit():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(150, 4))
    y = rng.integers(0, 3, 150)
    z[np.arange(150), y] += 1.5
    w = rng.uniform(0.2, 3.0, 150)
    l2 = 0.05
    W, b, _ = fit_softmax(z, y, 3, weights=w, l2=l2, max_iter=500)
    # sklearn: C * sum_i w_i CE_i + |W|^2 / 2  ==  (sum_i w_i CE_i / sum w + l2 / 2 |W|^2) * C * sum w
    clf = LogisticRegression(C=1.0 / (l2 * w.sum()), max_iter=5000, tol=1e-10).fit(z, y, sample_weight=w)
    assert np.allclose(W, clf.coef_, atol=2e-3)
    assert np.allclose(b - b.mean(), clf.intercept_ - clf.intercept_.mean(), atol=2e-3)


# --------------------------------------------------------------- GroupDRO
def hand_run_group_dro(z, y, g, n_groups, eta, l2, steps, lr, momentum=0.9):
    """Algorithm 1 of Sagawa et al. with full-batch gradients and Nesterov SGD, written out in numpy."""
    n, d = z.shape
    params = [np.zeros((2, d)), np.zeros(2)]
    bufs = [None, None]
    counts = np.bincount(g, minlength=n_groups)
    q = (counts > 0) / (counts > 0).sum()
    for _ in range(steps):
        W, b = params
        logits = z @ W.T + b
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        ce = -logp[np.arange(n), y]
        losses = np.bincount(g, weights=ce, minlength=n_groups) / np.maximum(counts, 1)
        q = q * np.exp(eta * losses)
        q = q / q.sum()
        r = (np.exp(logp) - np.eye(2)[y]) * (q[g] / np.maximum(counts, 1)[g])[:, None]  # d loss / d logits
        grads = [r.T @ z + l2 * W, r.sum(0)]
        for i, grad in enumerate(grads):
            bufs[i] = grad if bufs[i] is None else momentum * bufs[i] + grad
            params[i] = params[i] - lr * (grad + momentum * bufs[i])
    return params[0], params[1], q


def test_group_dro_weights_and_head_equal_a_hand_run_update(world):
    ctx = FakeContext(world)
    head = group_dro.GroupDROHead(steps=12, every=12, eta=0.5, l2=(1e-4,))
    head.fit(ctx)
    z, _ = standardized(world["train"])
    z = z.astype(np.float64)
    y, g = world["train"].y.numpy(), world["train"].group_ids().numpy()
    hp = head.hyperparameters()
    # the step size is 1 / (curvature bound + l2): the largest eigenvalue per group, computed directly
    ones = np.hstack([z, np.ones((len(z), 1))])
    bound = max(0.5 * np.linalg.eigvalsh(ones[g == k].T @ ones[g == k] / (g == k).sum()).max() for k in range(4))
    assert hp["curvature_bound"] == pytest.approx(bound + 1e-4, rel=1e-4) and hp["lr"] == pytest.approx(1 / (bound + 1e-4), rel=1e-4)
    W, b, q = hand_run_group_dro(z, y, g, 4, eta=0.5, l2=1e-4, steps=12, lr=hp["lr"])
    assert list(hp["group_weights"].values()) == pytest.approx(q.tolist(), rel=1e-4)
    assert abs(q - 0.25).max() > 0.01  # the weights really moved
    assert np.allclose(head.coef.numpy(), W, atol=1e-4) and np.allclose(head.intercept.numpy(), b, atol=1e-4)
    assert hp["labels_read"] == {"train": ["class", "group"], "val": ["class", "group"]} and hp["eta"] == 0.5


def test_group_dro_trains_every_l2_at_once_and_stops_where_val_is_best(world):
    ctx = FakeContext(world)
    head = group_dro.GroupDROHead(steps=40, every=10, l2=(1e-4, 0.5))
    head.fit(ctx)
    hp = head.hyperparameters()
    z, scaler = standardized(world["train"])
    y, g = world["train"].y.numpy(), world["train"].group_ids().numpy()
    zv, _ = standardized(world["val"], scaler)
    yv, gv = world["val"].y.numpy(), world["val"].group_ids().numpy()
    table = []
    for steps in (10, 20, 30, 40):  # each (l2, step) candidate rerun alone, from scratch
        for l2 in (1e-4, 0.5):
            W, b, _ = hand_run_group_dro(z.astype(np.float64), y, g, 4, eta=0.01, l2=l2, steps=steps,
                                         lr=1 / (hp["curvature_bound"]))
            table.append({"l2": l2, "step": steps, "worst_group_acc": worst_group_accuracy(np.argmax(zv @ W.T + b, 1), yv, gv)})
    assert [(r["l2"], r["step"]) for r in hp["candidates"]] == [(r["l2"], r["step"]) for r in table]
    assert [r["worst_group_acc"] for r in hp["candidates"]] == pytest.approx([r["worst_group_acc"] for r in table], abs=0.02)
    first_best = max(hp["candidates"], key=lambda r: r["worst_group_acc"])
    assert hp["chosen"] == {"l2": first_best["l2"], "step": first_best["step"]} and hp["chosen_on"] == "val"
    assert (head.l2_chosen, head.step_chosen) == (first_best["l2"], first_best["step"])


def test_group_dro_skips_empty_groups():
    train = make_split(np.random.default_rng(4), (50, 0, 10, 50))
    val = make_split(np.random.default_rng(5), (10, 10, 10, 10))
    head = group_dro.GroupDROHead(steps=3, l2=(1e-4,))
    head.fit(FakeContext({"train": train, "val": val}))
    weights = head.hyperparameters()["group_weights"]
    assert weights["y:c0_a:a1"] == 0.0 and sum(weights.values()) == pytest.approx(1.0)


# -------------------------------------------------------------------- JTT
def test_jtt_error_set_weights_and_val_choice(world):
    splits = {**world, "train": NoGroups(*[getattr(world["train"], f) for f in ("keys", "features", "fields", "schema")])}
    ctx = FakeContext(splits)
    head = jtt.JTTHead(lambda_up=(1.0, 20.0), stage1_l2=(1.0,))
    head.fit(ctx)  # never reads train's group labels
    z, scaler = standardized(world["train"])
    y = world["train"].y.numpy()
    # stage 1 independently: sklearn's binary logistic regression with the same penalty
    # (softmax rows -w/2, w/2 carry l2/2 (|w/2|^2 + |w/2|^2) = l2/4 |w|^2 -> C = 2 / (l2 N))
    clf = LogisticRegression(C=2.0 / (1.0 * len(y)), max_iter=5000, tol=1e-10).fit(z, y)
    wrong = clf.predict(z) != y
    hp = head.hyperparameters()
    assert hp["error_set"] == {"size": int(wrong.sum()), "per_class": np.bincount(y[wrong], minlength=2).tolist()}
    assert 0 < wrong.sum() < 200 and np.array_equal(jtt.jtt_weights(wrong, 20.0), np.where(wrong, 20.0, 1.0))
    # each candidate's val worst-group accuracy, recomputed; the first best is chosen
    zv, _ = standardized(world["val"], scaler)
    yv, gv = world["val"].y.numpy(), world["val"].group_ids().numpy()
    scores = []
    for lam in (1.0, 20.0):
        W, b, _ = fit_softmax(z, y, 2, weights=np.where(wrong, lam, 1.0), l2=1e-4)
        scores.append(worst_group_accuracy(np.argmax(zv @ W.T + b, 1), yv, gv))
    assert [c["worst_group_acc"] for c in hp["candidates"]] == pytest.approx(scores, abs=0.02)
    assert hp["chosen"]["lambda_up"] == (1.0, 20.0)[int(np.argmax([c["worst_group_acc"] for c in hp["candidates"]]))]
    assert hp["chosen_on"] == "val" and hp["chosen_by"] == "worst_group_acc"
    assert scores[1] > scores[0]  # upweighting the errors helps the minority groups here
    assert hp["labels_read"] == {"train": ["class"], "val": ["class", "group"]}
    json.dumps(hp, allow_nan=False)


# -------------------------------------------------------------------- AFR
def test_afr_weights_are_exp_minus_gamma_p_true():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5], [3.0, -1.0]])
    y = np.array([0, 0, 1, 1])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p_true = p[np.arange(4), y]
    raw = np.exp(-2.0 * p_true)
    assert np.allclose(afr.afr_weights(logits, y, 2.0, rebalance=False), raw / raw.sum())
    y_unbalanced = np.array([0, 0, 0, 1])
    p_true = p[np.arange(4), y_unbalanced]
    raw = np.exp(-2.0 * p_true) * np.array([4 / 3, 4 / 3, 4 / 3, 4.0])
    assert np.allclose(afr.afr_weights(logits, y_unbalanced, 2.0, rebalance=True), raw / raw.sum())
    assert np.allclose(afr.afr_weights(logits, y, 0.0, rebalance=False), 0.25)


def test_afr_split_stage1_anchor_and_val_choice(world):
    splits = {**world, "train": NoGroups(*[getattr(world["train"], f) for f in ("keys", "features", "fields", "schema")])}
    ctx = FakeContext(splits)
    head = afr.AFRHead(gamma=(0.0, 4.0), reg=(10.0, 1e-3))
    head.fit(ctx)
    hp = head.hyperparameters()
    z, scaler = standardized(world["train"])
    y = world["train"].y.numpy()
    first, second = afr.stratified_split(y, 0.8, ctx.rng("afr/split"))
    assert (hp["stage1_size"], hp["stage2_size"]) == (first.size, second.size) == (640, 160)
    assert np.array_equal(np.bincount(y[first]), [320, 320]) and np.intersect1d(first, second).size == 0
    W1, b1, _ = fit_softmax(z[first], y[first], 2, l2=1e-4)
    zv, _ = standardized(world["val"], scaler)
    yv, gv = world["val"].y.numpy(), world["val"].group_ids().numpy()
    scores, heads = [], []
    for gamma in (0.0, 4.0):
        w = afr.afr_weights(z[second] @ W1.T + b1, y[second], gamma, rebalance=True)
        for reg in (10.0, 1e-3):
            W, b, _ = fit_softmax(z[second], y[second], 2, weights=w, l2=2 * reg, anchor=(W1, b1))
            heads.append((W, b))
            scores.append(worst_group_accuracy(np.argmax(zv @ W.T + b, 1), yv, gv))
    assert [c["worst_group_acc"] for c in hp["candidates"]] == pytest.approx(scores, abs=0.02)
    best = int(np.argmax([c["worst_group_acc"] for c in hp["candidates"]]))
    assert hp["chosen"] == {"gamma": (0.0, 4.0)[best // 2], "reg": (10.0, 1e-3)[best % 2]}
    assert (head.gamma_chosen, head.reg_chosen) == (hp["chosen"]["gamma"], hp["chosen"]["reg"])
    assert np.allclose(head.coef.numpy(), heads[best][0], atol=1e-3)
    # a strong pull keeps the stage-2 head at the stage-1 head
    assert np.abs(heads[0][0] - W1).max() < 0.05 * np.abs(W1).max()
    assert hp["labels_read"] == {"train": ["class"], "val": ["class", "group"]}


def test_afr_bad_fraction_is_one_line():
    with pytest.raises(ValueError, match=r"^afr: stage1_fraction must be in \(0, 1\), got 1.0$"):
        afr.AFRHead(stage1_fraction=1.0).check(None)


# --------------------------------------------------------- class-balanced
def test_class_balanced_weights_and_head_match_sklearn(world):
    y = np.array([0] * 900 + [1] * 100)
    w = class_balanced.class_balanced_weights(y, 3, 0.999)
    raw = np.array([(1 - 0.999) / (1 - 0.999**900), (1 - 0.999) / (1 - 0.999**100)])
    assert np.allclose(w[:2], raw / raw.sum() * 2) and w[2] == 0.0
    assert np.allclose(class_balanced.class_balanced_weights(y, 2, 1.0), np.array([1 / 900, 1 / 100]) / (1 / 900 + 1 / 100) * 2)
    assert np.allclose(class_balanced.class_balanced_weights(y, 2, 0.0), [1.0, 1.0])
    # three unbalanced classes: the head is sklearn's weighted multinomial fit
    rng = np.random.default_rng(5)
    train = make_split(rng, (200, 200, 40, 40, 15, 15), prefix="tr")
    splits = {"train": NoGroups(*[getattr(train, f) for f in ("keys", "features", "fields", "schema")])}
    head = class_balanced.ClassBalancedHead(beta=0.99, l2=0.01, max_iter=500)
    head.fit(FakeContext(splits))
    z, _ = standardized(train)
    yt = train.y.numpy()
    sw = class_balanced.class_balanced_weights(yt, 3, 0.99)[yt]
    clf = LogisticRegression(C=1.0 / (0.01 * sw.sum()), max_iter=5000, tol=1e-10).fit(z, yt, sample_weight=sw)
    assert np.allclose(head.coef.numpy(), clf.coef_, atol=2e-3)
    assert head.hyperparameters()["labels_read"] == {"train": ["class"]}


# -------------------------------------------------------- label-free DFR
def test_dfr_labelfree_balances_val_by_erm_errors_without_group_labels(world):
    no_groups = {k: NoGroups(*[getattr(v, f) for f in ("keys", "features", "fields", "schema")]) for k, v in world.items()}
    ctx = FakeContext(no_groups)
    head = dfr_labelfree.DFRLabelFree(n_fits=3)
    head.fit(ctx)
    # stage 1 independently: erm_head's recipe (sklearn lbfgs, C = 1, its seed) on train
    train, val = world["train"], world["val"]
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=int(ctx.rng("erm_head").integers(2**31 - 1)))
    clf.fit(train.features.numpy(), train.y.numpy())
    yv = val.y.numpy()
    wrong = clf.predict(val.features.numpy()) != yv
    g = 2 * yv + wrong
    hp = head.hyperparameters()
    names = ["y:c0_stage1:right", "y:c0_stage1:wrong", "y:c1_stage1:right", "y:c1_stage1:wrong"]
    assert hp["inferred_groups"] == dict(zip(names, np.bincount(g, minlength=4).tolist(), strict=True))
    assert hp["stage1"]["val_errors"] == int(wrong.sum()) > 0
    smallest = np.bincount(g, minlength=4)[np.bincount(g, minlength=4) > 0].min()
    for idx in head.final_indices:  # each final fit: balanced over the inferred groups
        counts = np.bincount(g[idx], minlength=4)
        assert set(counts[counts > 0].tolist()) == {smallest}
    assert hp["labels_read"] == {"train": ["class"], "val": ["class"]}
    assert hp["selection"].startswith("held-out half of 'val'")


def test_a_head_reads_only_the_splits_and_labels_it_declares(world):
    class Sneaky(LinearHead):
        name = "sneaky"
        needs = Needs(fit_splits=("train",), labels=frozenset({"class"}))

        def fit_head(self, x, y, groups, ctx):
            self.split_data(ctx, self.read, groups=self.groups)
            return np.zeros((2, x.shape[1])), np.zeros(2)

    head = Sneaky()
    head.read, head.groups = "val", False
    with pytest.raises(ValueError, match=r"^sneaky: reads split 'val', which its needs do not declare"):
        head.fit(FakeContext(world))
    head.read, head.groups = "train", True
    with pytest.raises(ValueError, match=r"^sneaky: reads the group labels of 'train', which its needs do not"):
        head.fit(FakeContext(world))
