"""scripts/world_results.py end to end in --quick mode: one tiny world task, two cheap heads,
one seed; the Markdown it writes must carry the numbers of the results JSON it ran."""

from __future__ import annotations

import json


def _row(markdown: str, after: str, method: str, column: int = 2) -> list[str]:
    """The cells of the first table row after the line ``after`` whose ``column`` is ``method``."""
    lines = markdown.splitlines()
    for line in lines[lines.index(after):]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) > column and cells[column] == method:
            return cells
    raise AssertionError(f"no row {method!r} after {after!r}")


def _cell(metrics: dict, key: str) -> str:
    value, low, high = metrics[key], metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]
    return f"{value:.3f} [{low:.3f}, {high:.3f}]".replace("|", "\\|")


def test_quick_run_writes_the_json_numbers(tmp_path, load_script):
    script = load_script("world_results")
    work, out = tmp_path / "work", tmp_path / "docs" / "results.md"
    argv = ["--quick", "--tasks", "waterbirds_like", "--seeds", "0", "--methods", "erm_head", "class_balanced_head",
            "--work_dir", str(work), "--output", str(out), "--feature_cache", str(tmp_path / "features")]
    assert script.main(argv) == 0
    doc = json.loads((work / "waterbirds_like" / "0.json").read_text())
    metrics = doc["metrics"]
    assert list(doc["robust"]["methods"]) == ["zeroshot", "erm_head", "class_balanced_head"]
    markdown = out.read_text()
    assert "## waterbirds_like" in markdown
    assert "Ran (3): zeroshot, erm_head, class_balanced_head." in markdown
    for method in ("erm_head", "class_balanced_head"):
        cells = _row(markdown, "Seed 0, with intervals:", method)
        assert cells[3] == "1 (0)"  # runs (seeds)
        assert cells[4].strip("*") == _cell(metrics, f"{method}/worst_group_acc")
        assert cells[-1].strip("*") == _cell(metrics, f"{method}/delta_worst_group_acc_vs_zeroshot")
        summary = _row(markdown, "## Worst-group accuracy, all tasks", method, column=0)
        assert summary[1].strip("*") == _cell(metrics, f"{method}/worst_group_acc")
    zeroshot = _row(markdown, "Seed 0, with intervals:", "zeroshot")
    assert zeroshot[4].strip("*") == _cell(metrics, "zeroshot/worst_group_acc")
    assert "--world_train_size 120" in markdown and "wall time" in markdown

    # resumable: a second call runs no eval (the log is untouched) and writes the same tables
    log = work / "waterbirds_like" / "eval.log"
    stamp = log.stat().st_mtime_ns
    assert script.main(argv) == 0
    assert log.stat().st_mtime_ns == stamp
    assert _row(out.read_text(), "Seed 0, with intervals:", "erm_head") == _row(markdown, "Seed 0, with intervals:", "erm_head")
