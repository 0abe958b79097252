"""The plugin guide's example (docs/plugins.md) runs as written, through the public API only."""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def test_the_guide_example_plugin_registers_and_runs(tmp_path, monkeypatch, crp_plugin_manager, crp_eval):
    code = re.findall(r"```python\n(# my_package/plugin.py.*?)```", DOC.read_text(), flags=re.S)[0]
    (tmp_path / "guide_plugin.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import guide_plugin

    crp_plugin_manager.register(guide_plugin, name="guide")
    results = crp_eval("--temperature_value", "4", mitigation=["temperature"])
    metrics = results["metrics"]
    # dividing logits by a positive number changes no prediction
    assert metrics["temperature/acc"] == metrics["zeroshot/acc"]
    assert metrics["temperature/n_errors"] == metrics["zeroshot/n_errors"] > 0
    assert results["robust"]["methods"]["temperature"]["hyperparameters"] == {"value": 4.0}
    sys.modules.pop("guide_plugin", None)
