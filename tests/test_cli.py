"""End to end through ``clip_benchmark_robust`` (in-process, and plain clip_benchmark as a subprocess)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from clip_robust_plugins.groups import GroupSchema


def _no_constant(name: str):
    raise AssertionError(f"results JSON holds {name}, which strict JSON parsers reject")


def read_json(path, strict: bool = True) -> dict:
    """A results JSON; ours must be standard JSON (no NaN or Infinity), clip_benchmark's may not be."""
    with open(path) as fh:
        return json.load(fh, parse_constant=_no_constant) if strict else json.load(fh)


TINY = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--num_workers", "0"]


def test_results_json_agrees_exactly_with_predictions_csv(run_cli, shapes_flags, shapes_root, tmp_path):
    out = tmp_path / "res.json"
    rc, stdout, _ = run_cli(
        "eval", *shapes_flags, *TINY, "--mitigation", "erm_head", "--save_predictions",
        "--feature_cache", tmp_path / "cache", "--output", out,
    )
    assert rc == 0
    assert "worst group" in stdout and "erm_head" in stdout  # the per-group table
    dump = read_json(out)
    assert set(dump) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    metrics = dump["metrics"]
    rows = list(csv.DictReader(open(tmp_path / "res_predictions.csv")))
    assert list(rows[0]) == ["key", "y", "group", "pred_zeroshot", "pred_erm_head"]
    assert len(rows) == 32 and len({r["key"] for r in rows}) == 32
    schema = GroupSchema.read(shapes_root / "groups.json")
    train = dict(zip(schema.group_names(), schema.counts("train")))
    for method in ("zeroshot", "erm_head"):
        hits, counts = defaultdict(int), defaultdict(int)
        for r in rows:
            counts[r["group"]] += 1
            hits[r["group"]] += int(r[f"pred_{method}"] == r["y"])
        accs = {g: hits[g] / counts[g] for g in counts}
        for g in schema.group_names():
            assert metrics[f"{method}/group_count/{g}"] == counts[g]
            assert metrics[f"{method}/group_acc/{g}"] == accs[g]
        worst = min(accs, key=accs.get)
        assert metrics[f"{method}/worst_group_acc"] == accs[worst]
        assert metrics[f"{method}/acc"] == sum(hits.values()) / len(rows)
        weighted = sum(train[g] * accs[g] for g in accs) / sum(train[g] for g in accs)
        assert metrics[f"{method}/acc_train_weighted"] == pytest.approx(weighted, abs=1e-12)
        assert metrics[f"{method}/acc_group_mean"] == pytest.approx(np.mean(list(accs.values())), abs=1e-12)
    assert metrics["acc1"] == metrics["zeroshot/acc1"] == metrics["zeroshot/acc"]
    assert metrics["acc5"] is None and "fewer than 5" in dump["robust"]["null_values"]["acc5"]  # two classes: null
    assert dump["robust"]["methods"]["erm_head"]["needs"]["labels"] == ["class"]


def test_second_run_reads_the_feature_cache(run_cli, shapes_flags, tmp_path):
    args = ["eval", *shapes_flags, *TINY, "--mitigation", "erm_head", "--feature_cache", tmp_path / "cache"]
    assert run_cli(*args, "--output", tmp_path / "a.json")[0] == 0
    assert run_cli(*args, "--output", tmp_path / "b.json")[0] == 0
    first, second = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert [e["split"] for e in first["robust"]["features_extracted"]] == ["test", "train"]
    assert second["robust"]["features_extracted"] == []
    assert json.dumps(first["metrics"], sort_keys=True) == json.dumps(second["metrics"], sort_keys=True)
    # a corrupt cache file is rebuilt, not read
    victim = Path(first["robust"]["feature_cache"][0])
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.warns(UserWarning, match="rebuilding"):
        assert run_cli(*args, "--output", tmp_path / "c.json")[0] == 0
    third = read_json(tmp_path / "c.json")
    assert len(third["robust"]["features_extracted"]) == 1
    assert json.dumps(first["metrics"], sort_keys=True) == json.dumps(third["metrics"], sort_keys=True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mitigation", "no_such_method"], "unknown mitigation 'no_such_method'"),
        (["--split", "holdout"], "has no split 'holdout'"),
        (["--task", "linear_probe"], "task 'linear_probe' is not available"),
    ],
)
def test_bad_requests_fail_with_one_line_and_write_nothing(run_cli, shapes_flags, tmp_path, extra, message):
    out = tmp_path / "res.json"
    rc, _, err = run_cli("eval", *shapes_flags, *TINY, "--no_feature_cache", "--output", out, *extra)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("clip_benchmark_robust: error:") and message in last
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _plain_clip_benchmark(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Plain ``clip_benchmark``; on numpy>=2.4 its own accuracy() crash is asserted, then it
    is rerun with only that function replaced (what 'clip_benchmark's result' can mean there)."""
    proc = subprocess.run(["clip_benchmark", *argv], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        assert "only 0-dimensional arrays can be converted to Python scalars" in proc.stderr, proc.stderr[-2000:]
        shim = (
            "import sys, clip_benchmark.metrics.zeroshot_classification as z\n"
            "from clip_robust_plugins.compat import accuracy\n"
            "z.accuracy = accuracy\n"
            "from clip_benchmark.cli import main\n"
            "sys.argv = ['clip_benchmark'] + sys.argv[1:]\n"
            "main()\n"
        )
        proc = subprocess.run([sys.executable, "-c", shim, *argv], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def vit_s_32_checkpoint(tmp_path_factory) -> Path:
    """A seeded random-init ViT-S-32 saved as a local file (stands in for real weights)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vit") / "vit_s_32_random.safetensors"
    torch.manual_seed(0)  # test code: the global RNG is ours here
    model = open_clip.create_model("ViT-S-32")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("ours_flags", "plain_flags"), [((), ("--no_amp",)), (("--amp",), ())], ids=["fp32", "amp"])
def test_plain_clip_benchmark_command_line_gives_the_same_acc1(run_cli, shapes_root, vit_s_32_checkpoint, tmp_path,
                                                               ours_flags, plain_flags):
    """Acceptance: `eval --dataset wds/NAME --dataset_root DIR --model ViT-S-32 --pretrained FILE` via both CLIs,
    under the same precision: our CPU default (fp32) is clip_benchmark's --no_amp; our --amp its default."""
    argv = [
        "eval", "--dataset", "wds/spurious_shapes", "--dataset_root", str(shapes_root),
        "--model", "ViT-S-32", "--pretrained", str(vit_s_32_checkpoint), "--num_workers", "0",
    ]
    results = tmp_path / "results"
    results.mkdir()
    _plain_clip_benchmark([*argv, *plain_flags, "--output", str(results / "plain.json")], cwd=tmp_path)
    rc, _, _ = run_cli(*argv, *ours_flags, "--output", results / "robust.json", "--no_feature_cache")
    assert rc == 0
    plain, ours = read_json(results / "plain.json", strict=False), read_json(results / "robust.json")
    assert ours["metrics"]["acc1"] == plain["metrics"]["acc1"]
    assert ours["metrics"]["mean_per_class_recall"] == pytest.approx(plain["metrics"]["mean_per_class_recall"], abs=1e-12)
    assert "zeroshot/worst_group_acc" in ours["metrics"]
    # clip_benchmark's build turns the directory into one CSV, through both CLIs
    assert run_cli("build", results, "--output", tmp_path / "ours.csv")[0] == 0
    subprocess.run(["clip_benchmark", "build", str(results), "--output", str(tmp_path / "plain.csv")], check=True)
    for name in ("ours.csv", "plain.csv"):
        rows = list(csv.DictReader(open(tmp_path / name)))
        assert len(rows) == 2 and {r["acc1"] for r in rows} == {str(plain["metrics"]["acc1"])}
        assert "zeroshot/worst_group_acc" in rows[0]


def test_wds_without_groups_evaluates_at_class_level(run_cli, shapes_root, tmp_path):
    """clip_benchmark-layout shards without groups.json: our engine, groups = classes, a note."""
    plain_root = tmp_path / "plain"
    shutil.copytree(shapes_root, plain_root)
    os.remove(plain_root / "groups.json")
    out, grouped = tmp_path / "res.json", tmp_path / "grouped.json"
    rc, _, err = run_cli(
        "eval", "--dataset", "wds/plain", "--dataset_root", plain_root, *TINY, "--output", out, "--no_amp",
        "--mitigation", "erm_head", "--no_feature_cache",
    )
    assert rc == 0 and "no group metadata" in err
    dump = read_json(out)
    assert "no group metadata" in dump["robust"]["note"]
    metrics = dump["metrics"]
    assert dump["robust"]["groups"] == ["y:square", "y:diamond"]
    assert metrics["erm_head/worst_group_acc"] == metrics["erm_head/worst_class_acc"]
    rc, _, _ = run_cli(
        "eval", "--dataset", "wds/plain", "--dataset_root", shapes_root, *TINY, "--output", grouped, "--no_amp",
        "--no_feature_cache",
    )
    assert rc == 0
    assert read_json(grouped)["metrics"]["acc1"] == metrics["acc1"]  # same shards, same predictions
    rc, _, err = run_cli(
        "eval", "--dataset", "cifar10", "--dataset_root", tmp_path / "none", *TINY, "--output", out,
        "--mitigation", "erm_head",
    )
    assert rc == 2 and "needs a group dataset" in err


def _help(capsys, *argv: str) -> tuple[int, str, str]:
    from clip_robust_plugins import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_eval_help_shows_the_common_flags_and_names_the_topics(capsys):
    code, out, _ = _help(capsys, "eval", "--help")
    assert code == 0
    assert out.startswith("usage: clip_benchmark_robust eval --dataset NAME --model MODEL --pretrained TAG")
    for flag in ("--dataset", "--model", "--pretrained", "--mitigation", "--split", "--output", "--plugin", "--help-all"):
        assert f"  {flag}" in out
    for flag in ("--cfr_epochs", "--shapes_correlation", "--erm_head_C", "--fewshot_k", "--recall_k"):
        assert flag not in out  # the rest waits for --help-all or --help TOPIC
    assert "Topics:" in out and "dfr" in out.split("Topics:")[1]
    assert len(out.splitlines()) < len(_help(capsys, "eval", "--help-all")[1].splitlines()) / 3


def test_eval_help_all_groups_every_flag_by_plugin_with_a_heading_per_method(capsys, crp_plugin_manager):
    code, out, _ = _help(capsys, "eval", "--help-all")
    assert code == 0
    lines = out.splitlines()
    headings = [line for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[0] == "common flags:" and headings[-1] == "clip_benchmark (other tasks, datasets and models):"
    registry = crp_plugin_manager.registry
    for name, spec in registry.mitigations.items():
        if spec.options is not None:
            assert f"method {name} (plugin {registry.owner('mitigations', name)}):" in headings
    for flag in ("--cfr_epochs", "--shapes_correlation", "--erm_head_C", "--fewshot_k", "--ravl_grid", "--seraser_n_aug"):
        assert sum(line.split()[0] == flag for line in lines if line.strip()) == 1, flag  # listed once
    # --split and --test_split are one flag; each has its own description now
    split = next(line for line in lines if line.startswith("  --split SPLIT"))
    test_split = next(line for line in lines if line.startswith("  --test_split SPLIT"))
    assert split.split("SPLIT", 1)[1].strip() != test_split.split("SPLIT", 1)[1].strip()


def test_eval_help_topic_shows_one_method_or_section(capsys):
    code, out, _ = _help(capsys, "eval", "--help", "dfr")
    assert code == 0 and "method dfr (plugin clip_robust_plugins.mitigations.dfr):" in out
    assert "--dfr_c_grid" in out and "--cfr_epochs" not in out and "--dataset_root" not in out
    _, out, _ = _help(capsys, "eval", "--help", "clip_ft")
    assert "--ravl_epochs" in out and "--ravl_influence_threshold" not in out  # clip_ft's own: ravl's fine-tuning
    _, out, _ = _help(capsys, "eval", "--help", "data")
    assert "--feature_cache" in out and "--dfr_c_grid" not in out
    code, _, err = _help(capsys, "eval", "--help", "no_such_topic")
    assert code == 2 and "no help topic 'no_such_topic'" in err and "dfr" in err


def test_an_unknown_flag_prints_the_subcommands_usage(capsys):
    code, out, err = _help(capsys, "eval", "--no_such_flag", "1")
    assert code == 2 and out == ""
    assert err.startswith("usage: clip_benchmark_robust eval ")
    assert "unrecognized arguments: --no_such_flag 1" in err.strip().splitlines()[-1]
    code, _, err = _help(capsys, "plugins", "--no_such_flag")
    assert code == 2 and err.startswith("usage: clip_benchmark_robust plugins")


def test_discover_help_lists_only_the_flags_discover_uses(capsys):
    code, out, _ = _help(capsys, "discover", "--help")
    assert code == 0
    for flag in ("--ravl_regions", "--ravl_grid", "--ravl_influence_threshold", "--shapes_correlation", "--split"):
        assert flag in out
    for prefix in ("--dfr_", "--cfr_", "--seraser_", "--erm_head_", "--ravl_epochs", "--ravl_lr"):
        assert prefix not in out, prefix


def test_plugins_prints_a_table_by_the_names_the_cli_takes(run_cli, crp_plugin_manager, monkeypatch):
    import clip_robust_plugins
    from clip_robust_plugins import cli

    monkeypatch.setattr(cli, "build_plugin_manager", lambda *a, **k: crp_plugin_manager.pm)
    rc, out, _ = run_cli("plugins")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["plugin", "version", "registers"]
    rc, machine, _ = run_cli("plugins", "--json")
    rows = json.loads(machine)
    starts = [line.split()[0] for line in lines[1:] if not line.startswith(" ")]
    assert starts == [r["name"] for r in rows]  # one row per plugin (long ones wrap under "registers")
    text = " ".join(" ".join(line.split()) for line in lines)
    version = clip_robust_plugins.__version__
    assert f"clip_robust_plugins.datasets.spurious_shapes {version} dataset robust/spurious_shapes" in text
    assert f"clip_robust_plugins.mitigations.dfr {version} methods dfr, dfr_labelfree, dfr_train" in text
    assert "crp-tiny,spurious_shapes" in text  # the name --pretrained_model takes
    shapes = next(r for r in rows if r["name"] == "clip_robust_plugins.datasets.spurious_shapes")
    assert shapes["registers"]["datasets"] == ["robust/spurious_shapes"]


def test_fitted_state_saves_and_reloads_without_refitting(run_cli, shapes_flags, tmp_path):
    common = ["eval", *shapes_flags, *TINY, "--mitigation", "erm_head", "--feature_cache", tmp_path / "cache", "--save_predictions"]
    assert run_cli(*common, "--save_mitigation_state", "--output", tmp_path / "fit.json")[0] == 0
    state_file = tmp_path / "fit_state_erm_head.safetensors"
    assert state_file.is_file() and not (tmp_path / "fit_state_zeroshot.safetensors").exists()
    assert run_cli(*common, "--mitigation_state", state_file, "--output", tmp_path / "load.json")[0] == 0
    loaded = read_json(tmp_path / "load.json")
    assert loaded["robust"]["methods"]["erm_head"]["state_loaded_from"] == str(state_file)
    assert loaded["robust"]["features_extracted"] == []  # neither refit (no train pass) nor re-extracted
    fit_rows = list(csv.DictReader(open(tmp_path / "fit_predictions.csv")))
    load_rows = list(csv.DictReader(open(tmp_path / "load_predictions.csv")))
    assert fit_rows == load_rows

    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a state")
    rc, _, err = run_cli(*common, "--mitigation_state", bogus, "--output", tmp_path / "x.json")
    assert rc == 2 and str(bogus) in err and not (tmp_path / "x.json").exists()
    rc, _, err = run_cli(
        "eval", *shapes_flags, *TINY, "--feature_cache", tmp_path / "cache", "--mitigation_state", state_file,
        "--output", tmp_path / "y.json",
    )
    assert rc == 2 and "not among --mitigation" in err


@pytest.mark.slow
def test_demo_runs_offline_and_writes_table_json_csv_png(run_cli, tmp_path):
    """Acceptance: the README's demo, at its default sizes (the numbers the README reports)."""
    out = tmp_path / "demo"
    rc, stdout, err = run_cli("demo", "--output_dir", out)
    assert rc == 0, err[-2000:]
    assert "worst group" in stdout
    dump = read_json(out / "results.json")
    rows = list(csv.DictReader(open(out / "results_predictions.csv")))
    assert len(rows) == 400
    assert (out / "results_groups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = dump["metrics"]
    from clip_robust_plugins.plugins import build_plugin_manager, collect_registry

    registered = set(collect_registry(build_plugin_manager()).mitigations)
    assert set(dump["robust"]["methods"]) == registered  # every registered mitigation ran
    # the shipped tiny model really leans on the background ...
    assert metrics["zeroshot/worst_group_acc"] <= metrics["zeroshot/acc"] - 0.2
    # ... and last-layer retraining on group-balanced val data repairs much of it
    assert metrics["dfr/worst_group_acc"] > metrics["zeroshot/worst_group_acc"] + 0.1
    # ... and SEraser with the dataset's masks (the demo's schedule) raises worst-group accuracy
    assert metrics["seraser/worst_group_acc"] > metrics["zeroshot/worst_group_acc"] + 0.1
    assert dump["robust"]["methods"]["seraser"]["hyperparameters"]["view_provider"] == "masks"
    # one read and decode per split: every kind any method needs comes from that pass
    passes = [entry["split"] for entry in dump["robust"]["features_extracted"]]
    assert sorted(passes) == sorted(set(passes)) == ["test", "train", "val"]
    # intervals for every method, and the report page the demo ends with
    for method in dump["robust"]["methods"]:
        assert metrics[f"{method}/worst_group_acc_ci_low"] <= metrics[f"{method}/worst_group_acc"]
    page = (out / "report" / "report.html").read_text()
    assert "robust/spurious_shapes" in page and "data:image/png;base64," in page
    assert stdout.strip().splitlines()[-1] == os.path.abspath(out / "report" / "report.html")  # the page, last
    json.loads((out / "results.json").read_text(), parse_constant=lambda c: 1 / 0)  # standard JSON: no NaN
    assert dump["robust"]["command_line"][:2] == ["clip_benchmark_robust", "eval"]
