"""LinearHead: the binary two-row form, unseen classes, state checks and the declared fit split."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clip_robust_plugins import LinearHead, Needs
from clip_robust_plugins.mitigations.erm_head import ERMHead, ERMHeadConfig
from clip_robust_plugins.mitigations.linear_head import NEVER


class FakeFeatures:
    def __init__(self, x, y, g):
        self.features, self.y, self._g = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y), torch.as_tensor(g)

    def group_ids(self):
        return self._g


def fake_ctx(splits: dict, n_classes: int):
    asked = []

    def features(split):
        asked.append(split)
        return splits[split]

    return SimpleNamespace(features=features, n_classes=n_classes, asked=asked,
                           rng=lambda salt: np.random.default_rng(0))


class Fixed(LinearHead):
    """Returns whatever rows it is given, to test the base's handling of them."""

    name = "fixed"
    needs = Needs(fit_splits=("val",), labels=frozenset({"class"}))

    def __init__(self, coef, intercept):
        super().__init__()
        self.rows = (coef, intercept)
        self.seen_groups = "unset"

    def fit_head(self, x, y, groups, ctx):
        self.seen_groups = groups
        return self.rows


X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_binary_row_becomes_two_class_rows_with_the_same_decision():
    w, c = np.array([[2.0, -1.0]]), np.array([0.5])
    ctx = fake_ctx({"val": FakeFeatures(X, [0, 1, 1], [0, 1, 1]), "test": FakeFeatures(X, [0, 1, 1], [0, 0, 0])}, 2)
    head = Fixed(w, c)
    head.fit(ctx)
    assert ctx.asked[0] == "val"  # the split comes from needs.fit_splits
    assert head.seen_groups is None  # no group labels for a head that did not declare them
    logits = head.predict(ctx, "test").numpy()
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], X @ w[0] + c[0], rtol=1e-6)
    np.testing.assert_allclose(logits.sum(1), 0.0, atol=1e-6)


def test_a_class_absent_from_the_fit_split_is_never_predicted():
    coef, intercept = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.0, 0.0])  # rows for classes 0 and 2
    ctx = fake_ctx({"val": FakeFeatures(X, [0, 2, 2], [0, 1, 1]), "test": FakeFeatures(X, [0, 1, 2], [0, 0, 0])}, 3)
    head = Fixed(coef, intercept)
    head.fit(ctx)
    logits = head.predict(ctx, "test")
    assert float(logits[:, 1].max()) == pytest.approx(NEVER)
    np.testing.assert_allclose(logits[:, [0, 2]].numpy(), X @ coef.numpy().T)


def test_state_roundtrip_and_one_line_errors_for_foreign_state():
    ctx = fake_ctx({"val": FakeFeatures(X, [0, 1, 1], [0, 1, 1])}, 2)
    head = Fixed(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.1, 0.2]))
    head.fit(ctx)
    restored = Fixed(None, None)
    restored.load_state_dict(head.state_dict())
    assert torch.equal(restored.predict(ctx, "val"), head.predict(ctx, "val"))
    with pytest.raises(ValueError, match="fixed: expected a state with tensors 'coef' and 'intercept'"):
        restored.load_state_dict({"bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="do not form"):
        restored.load_state_dict({"coef": torch.zeros(3, 2), "intercept": torch.zeros(2)})
    restored.load_state_dict({"coef": torch.zeros(2, 5), "intercept": torch.zeros(2)})
    with pytest.raises(ValueError, match="5"):
        restored.predict(ctx, "val")
    with pytest.raises(ValueError, match="fit_head returned 3 rows"):
        Fixed(np.zeros((3, 2)), np.zeros(3)).fit(fake_ctx({"val": FakeFeatures(X, [0, 1, 0], [0, 0, 0])}, 2))


def test_erm_head_equals_a_direct_sklearn_fit():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 4))
    y = (x[:, 0] > 0).astype(int)
    ctx = fake_ctx({"train": FakeFeatures(x, y, np.zeros(40, int))}, 2)
    head = ERMHead(ERMHeadConfig(C=0.5))
    head.fit(ctx)
    clf = LogisticRegression(C=0.5, max_iter=1000).fit(x.astype(np.float32), y)
    margin = head.predict(ctx, "train").numpy() @ np.array([-1.0, 1.0])
    np.testing.assert_allclose(margin, clf.decision_function(x.astype(np.float32)), rtol=1e-4, atol=1e-4)
    assert head.hyperparameters() == {"fit_split": "train", "C": 0.5, "max_iter": 1000, "solver": "lbfgs"}


def test_the_guide_linear_head_runs_and_is_nearest_class_mean(tmp_path, monkeypatch, crp_plugin_manager, crp_eval):
    import re
    import sys
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
    code = re.findall(r"```python\n(# my_package/centroid_head.py.*?)```", doc.read_text(), flags=re.S)[0]
    (tmp_path / "guide_centroid.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import guide_centroid

    # independent check on a small case: the head's argmax is the nearest class mean
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 3)), rng.integers(0, 3, size=50)
    ctx = fake_ctx({"train": FakeFeatures(x, y, np.zeros(50, int))}, 3)
    head = guide_centroid.CentroidHead(guide_centroid.CentroidConfig())
    head.fit(ctx)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    nearest = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(head.predict(ctx, "train").argmax(1).numpy(), nearest)

    crp_plugin_manager.register(guide_centroid, name="guide_centroid")
    results = crp_eval("--centroid_shrink", "0.5", mitigation=["centroid_head"])
    assert results["robust"]["methods"]["centroid_head"]["hyperparameters"] == {"fit_split": "train", "shrink": 0.5}
    assert 0.0 <= results["metrics"]["centroid_head/worst_group_acc"] <= 1.0
    sys.modules.pop("guide_centroid", None)
