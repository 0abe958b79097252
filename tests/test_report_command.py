"""``clip_benchmark_robust report``: two seeds of one eval and one eval of another model."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import os
import shlex
from pathlib import Path

import pytest

from clip_robust_plugins import Mitigation, MitigationSpec, cli, hookimpl, option
from clip_robust_plugins.pytest_plugin import TINY_SHARDS_FLAGS
from clip_robust_plugins.report import write_report
from clip_robust_plugins.report.build import ReportWarning
from clip_robust_plugins.report.load import interval_of


@pytest.fixture(scope="module")
def results(tmp_path_factory, crp_tiny_shards) -> dict[str, Path]:
    """Three results JSONs: crp-tiny/spurious_shapes with seeds 0 and 1, crp-tiny/spurious_quadrants seed 0."""
    out = tmp_path_factory.mktemp("report_runs")
    cache = tmp_path_factory.mktemp("report_features")
    runs = {"s0": ("spurious_shapes", 0), "s1": ("spurious_shapes", 1), "q0": ("spurious_quadrants", 0)}
    for name, (pretrained, seed) in runs.items():
        argv = ["eval", "--dataset", "robust/spurious_shapes", "--dataset_root", str(crp_tiny_shards),
                *TINY_SHARDS_FLAGS, "--model", "crp-tiny", "--pretrained", pretrained, "--seed", str(seed),
                "--mitigation", "erm_head", "--bootstrap_samples", "200", "--no_amp", "--num_workers", "0",
                "--feature_cache", str(cache), "--output", str(out / f"{name}.json")]
        assert cli.main(argv) == 0
    return {name: out / f"{name}.json" for name in runs}


@pytest.fixture(scope="module")
def report_dir(results, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("report") / "out"
    written = write_report([str(results["s0"].parent)], str(directory))
    assert sorted(os.path.basename(p) for p in written) == sorted(os.listdir(directory))
    return directory


def test_report_writes_the_four_outputs(report_dir):
    names = set(os.listdir(report_dir))
    assert {"results_long.csv", "report.md", "report.html"} <= names
    pngs = sorted(n for n in names if n.endswith(".png"))
    slug = "robust_spurious_shapes"
    figures = [f"{slug}_worst_group.png", f"{slug}_groups.png", f"{slug}_forest.png", f"{slug}_worst_vs_average.png"]
    assert pngs == sorted(figures)
    for name in pngs:
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and 'src="http' not in page and 'src="robust' not in page
    embedded = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(embedded) == (report_dir / figures[0]).read_bytes()


def test_long_csv_values_equal_the_jsons(results, report_dir):
    with open(report_dir / "results_long.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen = set()
    for path in results.values():
        doc = json.loads(path.read_text())
        mine = [r for r in rows if r["source"] == str(path)]
        by_key = {(r["method"], r["metric"]): r for r in mine}
        assert len(by_key) == len(mine)  # one row per (method, metric) of a run
        for key, value in doc["metrics"].items():
            method, _, metric = key.partition("/")
            if not metric:
                continue  # clip_benchmark's top-level copies of the baseline's keys
            parsed = interval_of(metric)
            if parsed is not None and f"{method}/{parsed[0]}" in doc["metrics"]:
                row = by_key[(method, parsed[0])]
                cell = row["ci_low" if parsed[1] == "low" else "ci_high"]
            else:
                row = by_key[(method, metric)]
                cell = row["value"]
                assert (row["dataset"], row["model"], row["pretrained"], row["seed"]) == (
                    doc["dataset"], doc["model"], doc["pretrained"], str(doc["robust"]["seed"]))
            seen.add((str(path), method, metric))
            if isinstance(value, str):
                assert cell == value
            elif value is None:  # undefined (strict JSON: null, the reason in robust.null_values)
                assert cell == ""
            else:
                assert float(cell) == value  # exactly
    assert len(seen) == sum(1 for p in results.values() for k in json.loads(p.read_text())["metrics"] if "/" in k)
    wga = [r for r in rows if r["metric"] == "worst_group_acc"]
    assert wga and all(r["ci_low"] and r["ci_high"] for r in wga)


def test_markdown_shows_mean_std_for_the_seeded_pair_and_intervals_for_the_single_run(results, report_dir):
    md = (report_dir / "report.md").read_text()
    assert "## robust/spurious_shapes (split test, 4 groups)" in md
    board = md.split("### Leaderboard", 1)[1].split("### Accuracy per group", 1)[0]
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in board.splitlines()
             if line.startswith("| crp-tiny")}
    pair = lines[("crp-tiny", "spurious_shapes", "zeroshot")]
    single = lines[("crp-tiny", "spurious_quadrants", "erm_head")]
    s0 = json.loads(results["s0"].read_text())["metrics"]
    s1 = json.loads(results["s1"].read_text())["metrics"]
    mean = (s0["zeroshot/worst_group_acc"] + s1["zeroshot/worst_group_acc"]) / 2
    assert f"{mean:.3f} ± " in pair and "2 (0, 1)" in pair
    q0 = json.loads(results["q0"].read_text())["metrics"]
    want = f"{q0['erm_head/worst_group_acc']:.3f} [{q0['erm_head/worst_group_acc_ci_low']:.3f}, " \
           f"{q0['erm_head/worst_group_acc_ci_high']:.3f}]"
    assert want in single and "±" not in single
    assert md.count("**") >= 2  # best per column marked
    assert len(lines) == 4  # 2 models x 2 methods


def test_runs_that_evaluated_other_groups_are_separate_rows(results, tmp_path):
    doc = json.loads(results["q0"].read_text())
    doc["robust"]["split"] = "val"
    other = tmp_path / "other_split.json"
    other.write_text(json.dumps(doc))
    out = tmp_path / "report"
    write_report([str(results["s0"]), str(other)], str(out))
    md = (out / "report.md").read_text()
    assert "(split test, 4 groups)" in md and "(split val, 4 groups)" in md
    assert "never averaged" in md
    assert {"robust_spurious_shapes_1_worst_group.png", "robust_spurious_shapes_2_worst_group.png"} <= set(os.listdir(out))


def test_a_foreign_json_gives_one_line_and_exit_2(results, tmp_path, run_cli):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"dataset": "cifar10", "model": "ViT-B-32", "pretrained": "openai",
                                   "metrics": {"acc1": 0.9}}))
    out = tmp_path / "report"
    rc, stdout, stderr = run_cli("report", str(results["s0"]), str(foreign), "--output_dir", str(out))
    assert rc == 2
    assert stderr.strip().count("\n") == 0 and str(foreign) in stderr and "not a clip_benchmark_robust results JSON" in stderr
    assert not out.exists()  # nothing half-written


def test_broken_json_and_missing_paths_name_the_file(tmp_path, run_cli):
    broken = tmp_path / "broken.json"
    broken.write_text('{"dataset": ')
    rc, _, stderr = run_cli("report", str(broken), "--output_dir", str(tmp_path / "r"))
    assert rc == 2 and str(broken) in stderr and "not valid JSON" in stderr
    rc, _, stderr = run_cli("report", str(tmp_path / "nope.json"), "--output_dir", str(tmp_path / "r"))
    assert rc == 2 and "nope.json: no such file or directory" in stderr


def test_report_command_from_the_cli(results, tmp_path, run_cli):
    rc, _, stderr = run_cli("report", str(results["s0"]), "--output_dir", str(tmp_path / "r"))
    assert rc == 0 and "report.html" in stderr
    assert (tmp_path / "r" / "results_long.csv").is_file()


# --------------------------------------------------------------------------- runs are grouped by what they did


@dataclasses.dataclass(frozen=True)
class ShiftConfig:
    shift: float = option(0.0, "added to class 1's zero-shot logit")
    steps: int = option(10, "unused; a second setting")


class _Shifted(Mitigation):
    def __init__(self, config: ShiftConfig):
        self.config = config

    def fit(self, ctx) -> None:
        ctx.zeroshot_head()

    def predict(self, ctx, split):
        logits = ctx.zeroshot_logits(ctx.features(split).features)
        logits[:, 1] += self.config.shift
        return logits


class _ShiftPlugin:
    @hookimpl
    def register_mitigations(self, register):
        register(MitigationSpec("shifted", lambda config: _Shifted(config), options=ShiftConfig, option_prefix="shift_"))


@pytest.fixture()
def shifted_runs(crp_plugin_manager, crp_eval, tmp_path) -> dict[str, Path]:
    """``shifted`` with its defaults (seeds 0 and 1, and seed 0 again) and with tuned settings (seed 0)."""
    crp_plugin_manager.register(_ShiftPlugin())
    runs = {"default0": ("0", ()), "default1": ("1", ()), "again0": ("0", ()),
            "tuned0": ("0", ("--shift_shift", "30", "--shift_steps", "5"))}
    out = {}
    for name, (seed, flags) in runs.items():
        crp_eval("--seed", seed, "--bootstrap_samples", "20", *flags, mitigation=["shifted"])
        out[name] = tmp_path / f"{name}.json"
        crp_eval.last_output.rename(out[name])
    return out


def _leaderboard(md: str) -> dict[str, str]:
    return {line.split("|")[3].strip(): line for line in md.splitlines() if line.startswith("| crp-tiny")}


def test_runs_differing_in_a_setting_are_separate_rows_named_by_it(shifted_runs, tmp_path):
    doc = json.loads(shifted_runs["tuned0"].read_text())
    assert doc["robust"]["methods"]["shifted"]["settings"] == {"shift": 30.0, "steps": 5}
    out = tmp_path / "report"
    with pytest.warns(ReportWarning, match="zeroshot: seed 0 with the same settings"):
        write_report([str(shifted_runs["default0"]), str(shifted_runs["tuned0"])], str(out))
    rows = _leaderboard((out / "report.md").read_text())
    assert set(rows) == {"zeroshot", "shifted (shift=0, steps=10)", "shifted (shift=30, steps=5)"}
    assert "1 (0)" in rows["shifted (shift=0, steps=10)"] and "1 (0)" in rows["shifted (shift=30, steps=5)"]
    page = (out / "report.html").read_text()
    assert "shifted (shift=30, steps=5)" in page and "shifted (shift=0, steps=10)" in page
    # zero-shot did the same in both runs (same seed, no settings): one run counted twice, with a warning
    assert "2 (0, 0)" in rows["zeroshot"] and "one run counted twice" in (out / "report.md").read_text()


def test_only_runs_differing_in_nothing_but_the_seed_are_averaged(shifted_runs, tmp_path, run_cli):
    out = tmp_path / "report"
    rc, _, stderr = run_cli("report", shifted_runs["default0"], shifted_runs["default1"], shifted_runs["tuned0"],
                            "--output_dir", out)
    assert rc == 0
    rows = _leaderboard((out / "report.md").read_text())
    assert set(rows) == {"zeroshot", "shifted (shift=0, steps=10)", "shifted (shift=30, steps=5)"}
    assert "2 (0, 1)" in rows["shifted (shift=0, steps=10)"] and "1 (0)" in rows["shifted (shift=30, steps=5)"]
    assert "3 (0, 1, 0)" in rows["zeroshot"]  # its seed 0 twice: warned
    assert "warning: crp-tiny / spurious_shapes / zeroshot: seed 0 with the same settings" in stderr
    # the same seed and settings twice is one run counted twice
    rc, _, stderr = run_cli("report", shifted_runs["default0"], shifted_runs["again0"], "--output_dir", tmp_path / "r2")
    assert rc == 0 and "shifted: seed 0 with the same settings in several files" in stderr


# --------------------------------------------------------------------------- the page in a real browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "firefox")


def _page_text_in_a_browser(page: Path, screenshot: Path) -> str | None:
    """The page's text as a headless browser renders it, and a screenshot; None when no browser is installed."""
    import importlib.util
    import re
    import shutil
    import subprocess

    if importlib.util.find_spec("playwright") is not None:
        from playwright.sync_api import Error, sync_playwright

        try:
            with sync_playwright() as p:
                browser = p.chromium.launch()
                tab = browser.new_page(viewport={"width": 1280, "height": 900})
                tab.goto(page.as_uri())
                tab.screenshot(path=str(screenshot), full_page=True)
                text = tab.inner_text("body")
                browser.close()
                return text
        except Error:  # playwright without its browsers: try a binary
            pass
    binary = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if binary is None:
        return None
    if "firefox" in os.path.basename(binary):
        subprocess.run([binary, "--headless", "--window-size=1280,900", "--screenshot", str(screenshot), page.as_uri()],
                       check=True, timeout=120, capture_output=True)
        return re.sub(r"<[^>]+>", " ", page.read_text())  # firefox has no DOM dump: the page's own text
    flags = ["--headless", "--disable-gpu", "--no-sandbox", "--window-size=1280,900"]
    subprocess.run([binary, *flags, f"--screenshot={screenshot}", page.as_uri()], check=True, timeout=120,
                   capture_output=True)
    dom = subprocess.run([binary, *flags, "--dump-dom", page.as_uri()], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    return re.sub(r"<[^>]+>", " ", dom)


def test_the_page_in_a_headless_browser(results, report_dir, tmp_path):
    screenshot = tmp_path / "report.png"
    text = _page_text_in_a_browser(report_dir / "report.html", screenshot)
    if text is None:
        pytest.skip(f"no headless browser installed (playwright, {', '.join(BROWSERS)})")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    for path in results.values():
        doc = json.loads(path.read_text())
        for name in [*doc["robust"]["methods"], *doc["robust"]["groups"]]:
            assert name in text, name
    assert "Accuracy per group" in text and "Commands" in text


def test_the_page_shows_the_methods_figures_the_discovery_sheet_and_the_commands(results, report_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    doc = json.loads(results["s0"].read_text())
    (runs / "s0.json").write_text(json.dumps(doc))
    png = (report_dir / "robust_spurious_shapes_forest.png").read_bytes()
    (runs / "s0_erm_head_curve.png").write_bytes(png)  # as `eval --plot` names a method's figure
    discovery = {"format": "clip_robust_plugins.ravl_discovery/2", "dataset": doc["dataset"], "model": doc["model"],
                 "pretrained": doc["pretrained"], "split": "val"}
    (runs / "discovery.json").write_text(json.dumps(discovery))  # `discover --output discovery.json` ...
    (runs / "discovery.png").write_bytes(png)  # ... and its sheet beside it
    out = tmp_path / "report"
    written = write_report([str(runs)], str(out))  # the discovery report is no run: no error
    page = (out / "report.html").read_text()
    assert "erm_head: curve" in page and "RaVL discovery sheet" in page and page.count("data:image/png;base64,") == 6
    assert {"robust_spurious_shapes_1_erm_head_curve.png", "robust_spurious_shapes_discovery_1.png"} <= {
        os.path.basename(p) for p in written}
    command = doc["robust"]["command_line"]
    assert command[:2] == ["clip_benchmark_robust", "eval"] and "--seed" in command
    assert html.escape(shlex.join(command)) in page and shlex.join(command) in (out / "report.md").read_text()
    assert "1 results file(s)" in page


def test_the_scatter_labels_methods_on_one_spot_together():
    from clip_robust_plugins.report.plots import label_clusters, place_labels

    points = [(0.95, 0.39, "zeroshot"), (0.95, 0.39, "erm_head"), (0.953, 0.41, "ravl"), (0.7, 0.6, "cfr")]
    labels = label_clusters(points)
    assert [t for *_, t in labels] == ["zeroshot = erm_head", "ravl", "cfr"]  # every method named, none hidden
    offsets = place_labels([(x, y) for x, y, _ in labels], scale=(360 / 0.4, 310 / 0.4))
    assert offsets[0] != offsets[1]  # the two nearby points' labels go different ways


def test_a_builtin_run_with_other_flags_is_its_own_row(crp_eval, tmp_path):
    """A tuned run of a built-in method (its settings recorded, or for a method that declares no
    options its ``--<method>_*`` flags from the recorded command line) is never averaged with a default run."""
    paths = []
    for name, flags in (("default", ()), ("tuned", ("--erm_head_C", "0.1"))):
        crp_eval("--bootstrap_samples", "20", *flags, mitigation=["erm_head"])
        paths.append(tmp_path / f"{name}.json")
        crp_eval.last_output.rename(paths[-1])
    out = tmp_path / "report"
    with pytest.warns(ReportWarning):  # zero-shot: the same run twice
        write_report([str(p) for p in paths], str(out))
    rows = _leaderboard((out / "report.md").read_text())
    heads = sorted(name for name in rows if name.startswith("erm_head"))
    assert len(heads) == 2 and "erm_head (C=0.1)" in heads, heads
    assert all("1 (0)" in rows[name] for name in heads)


def test_command_flags_of_a_method():
    from clip_robust_plugins.report.load import command_flags

    argv = ("clip_benchmark_robust", "eval", "--mitigation", "seraser", "dfr", "--seraser_lr", "1e-2", "--seraser_steps",
            "100", "--dfr_c_grid", "0.1", "1", "--seraser_black_view", "--seraser_views=masks", "--seed", "0")
    assert command_flags(argv, "seraser") == {"lr": "1e-2", "steps": "100", "black_view": True, "views": "masks"}
    assert command_flags(argv, "dfr") == {"c_grid": "0.1 1"}
    assert command_flags(argv, "zeroshot") == {}
