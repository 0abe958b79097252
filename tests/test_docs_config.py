"""The plugin guide's splits-and-labels example (docs/plugins.md) runs as written and records what it read."""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def test_the_guides_val_prior_reads_val_class_labels_only(tmp_path, monkeypatch, crp_plugin_manager, crp_eval,
                                                         crp_tiny_shards):
    import numpy as np

    from clip_robust_plugins import GroupSchema

    code = re.findall(r"```python\n(# my_package/val_prior.py.*?)```", DOC.read_text(), flags=re.S)[0]
    (tmp_path / "guide_val_prior.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import guide_val_prior

    crp_plugin_manager.register(guide_val_prior, name="guide_val_prior")
    results = crp_eval(mitigation=["val_prior"])
    info = results["robust"]["methods"]["val_prior"]
    assert info["labels_used"] == {"labels": "class", "splits": {"val": "class"}}
    assert info["needs"]["fit_splits"] == ["val"] and info["needs"]["labels"] == ["class"]
    # the tiny shards' val split is class-balanced: the correction is one constant, no prediction moves
    assert list(GroupSchema.read(crp_tiny_shards / "groups.json").counts("val")) == [6, 6, 6, 6]
    metrics = results["metrics"]
    assert metrics["val_prior/acc"] == metrics["zeroshot/acc"]
    # on an imbalanced val, the fitted correction is the log class frequencies
    import torch

    class FakeContext:
        n_classes = 3

        def labels(self, split, which="class"):
            assert (split, which) == ("val", "class")
            return torch.tensor([0, 0, 0, 1])

    method = guide_val_prior.ValPrior()
    method.fit(FakeContext())
    assert np.allclose(method.log_prior.numpy(), np.log([3 / 5, 1 / 5, 1 / 5]))  # an absent class counts once
    sys.modules.pop("guide_val_prior", None)
