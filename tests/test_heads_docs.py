"""The plugin guide's "A linear head in 40 lines" runs as written (public API only), and fits
what a direct ridge regression fits."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


@pytest.fixture
def ridge_module(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(# my_package/ridge_head.py.*?)```", DOC.read_text(), flags=re.S)[0]
    assert len(code.strip().splitlines()) <= 40, "the guide promises a linear head in 40 lines"
    (tmp_path / "guide_ridge_head.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import guide_ridge_head

    yield guide_ridge_head
    sys.modules.pop("guide_ridge_head", None)


class Features:
    def __init__(self, x, y):
        self.features, self.y = torch.from_numpy(x), torch.from_numpy(y)


class Context:
    """The part of a RunContext a linear head reads."""

    eval_split = "test"

    def __init__(self, splits, n_classes):
        self._splits, self.n_classes = splits, n_classes
        self.classnames = [f"c{i}" for i in range(n_classes)]

    def features(self, split, kind="image"):
        return self._splits[split]


def test_guide_head_equals_a_direct_ridge_regression(ridge_module):
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = np.repeat([0, 1, 3], 40)  # class 2 never occurs in train
    ctx = Context({"train": Features(x, y), "test": Features(x[:10], y[:10])}, n_classes=4)
    head = ridge_module.RidgeHead(alpha=0.5)
    head.fit(ctx)
    direct = Ridge(alpha=0.5).fit(x.astype(np.float64), np.eye(4)[y])
    present = [0, 1, 3]
    assert np.allclose(head.coef.numpy()[present], direct.coef_[present], atol=1e-8)
    assert np.allclose(head.intercept.numpy()[present], direct.intercept_[present], atol=1e-8)
    logits = head.predict(ctx, "test")
    assert logits.shape == (10, 4) and not (logits.argmax(1) == 2).any()  # the unseen class is never predicted
    restored = ridge_module.RidgeHead()
    restored.load_state_dict(head.state_dict())
    assert torch.equal(restored.predict(ctx, "test"), logits)


def test_guide_head_runs_through_eval(ridge_module, crp_plugin_manager, crp_eval):
    crp_plugin_manager.register(ridge_module, name="guide_ridge")
    results = crp_eval("--ridge_head_alpha", "0.5", mitigation=["ridge_head"])
    info = results["robust"]["methods"]["ridge_head"]
    assert info["hyperparameters"] == {"fit_split": "train", "alpha": 0.5, "labels_read": {"train": ["class"]}}
    assert info["needs"]["fit_splits"] == ["train"] and info["needs"]["labels"] == ["class"]
    assert 0.5 < results["metrics"]["ridge_head/acc"] <= 1.0
