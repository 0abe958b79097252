"""Remote (http) roots, brace shard patterns and pipe: refusal -- and no shell or subprocess anywhere.

A ThreadingHTTPServer on 127.0.0.1 (port 0, in a thread) serves copies of the session's
small spurious_shapes root; every remote run is compared with the local run of the same files.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import shlex
import shutil
import subprocess
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clip_robust_plugins.datasets.base import DatasetError
from clip_robust_plugins.datasets.sources import DataRoot, expand_shard_pattern, is_remote_root
from clip_robust_plugins.datasets.spurious_shapes import ShapesConfig, generate
from clip_robust_plugins.datasets.wds import GroupedShards

TINY = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--quiet", "--no_feature_cache", "--no_amp"]


class _Quiet(SimpleHTTPRequestHandler):
    requests_seen: Counter  # set per server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.requests_seen[("GET", self.path)] += 1
        super().do_GET()

    def do_HEAD(self):  # noqa: N802
        self.requests_seen[("HEAD", self.path)] += 1
        super().do_HEAD()


@pytest.fixture()
def serve():
    """serve(directory) -> (base URL, Counter of (method, path) requests); servers stop at teardown."""
    servers = []

    def start(directory: Path) -> tuple[str, Counter]:
        seen: Counter = Counter()
        handler = type("Handler", (_Quiet,), {"requests_seen": seen})
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def no_subprocess(monkeypatch):
    """Any attempt to start a process or a shell fails the test (webdataset binds Popen at import)."""
    calls: list[str] = []

    def forbidden(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called with {args!r}")

        return fail

    monkeypatch.setattr(subprocess, "Popen", forbidden("subprocess.Popen"))
    gopen_module = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name
    monkeypatch.setattr(gopen_module, "Popen", forbidden("webdataset.gopen.Popen"))
    monkeypatch.setattr(os, "system", forbidden("os.system"))
    monkeypatch.setattr(os, "popen", forbidden("os.popen"))
    return calls


def _eval(run_cli, root, out: Path, *extra) -> tuple[int, str, dict | None]:
    rc, _, err = run_cli(
        "eval", "--dataset", "wds/spurious_shapes", "--dataset_root", root, *TINY,
        "--num_workers", "0", "--save_predictions", "--output", out, *extra,
    )
    return rc, err, json.loads(out.read_text()) if rc == 0 else None


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(str(out).replace(".json", "_predictions.csv"))))


def test_remote_root_gives_the_local_metrics_without_any_subprocess(run_cli, shapes_root, serve, tmp_path, no_subprocess):
    base, seen = serve(shapes_root.parent)
    url = f"{base}/{shapes_root.name}"
    rc, err, local = _eval(run_cli, shapes_root, tmp_path / "local.json", "--mitigation", "erm_head")
    assert rc == 0, err
    rc, err, remote = _eval(run_cli, url, tmp_path / "remote.json", "--mitigation", "erm_head")
    assert rc == 0, err
    assert json.dumps(remote["metrics"], sort_keys=True) == json.dumps(local["metrics"], sort_keys=True)
    assert _rows(tmp_path / "remote.json") == _rows(tmp_path / "local.json")  # same samples, same order
    assert remote["robust"]["dataset_source"]["root"] == url
    assert seen[("GET", f"/{shapes_root.name}/groups.json")] == 1  # fetched once
    assert seen[("GET", f"/{shapes_root.name}/test/0.tar")] == 1 and seen[("GET", f"/{shapes_root.name}/train/0.tar")] == 1
    assert no_subprocess == []


def test_remote_root_with_dataloader_workers(run_cli, shapes_root, serve, tmp_path):
    base, _ = serve(shapes_root.parent)
    rc, err, local = _eval(run_cli, shapes_root, tmp_path / "local.json")
    assert rc == 0, err
    rc, err, remote = _eval(run_cli, f"{base}/{shapes_root.name}", tmp_path / "remote.json", "--num_workers", "2")
    assert rc == 0, err
    assert remote["metrics"] == local["metrics"]
    assert _rows(tmp_path / "remote.json") == _rows(tmp_path / "local.json")


@pytest.fixture(scope="module")
def patterned_root(tmp_path_factory) -> Path:
    """spurious_shapes (test: 32 samples in 4 shards of 8) renamed to shard-000.tar ..., no nshards.txt."""
    root = tmp_path_factory.mktemp("patterned") / "data"
    generate(root, ShapesConfig(train_size=64, val_size=32, test_size=32), progress=False, shard_size=8)
    for split_dir in (root / s for s in ("train", "val", "test")):
        for tar in split_dir.glob("*.tar"):
            tar.rename(split_dir / f"shard-{int(tar.stem):03d}.tar")
        (split_dir / "nshards.txt").unlink()
    return root


def test_brace_shard_pattern_local_and_remote(run_cli, patterned_root, serve, tmp_path, no_subprocess):
    # the same samples in clip_benchmark's layout, as the reference
    reference = tmp_path / "reference"
    shutil.copytree(patterned_root, reference)
    for tar in (reference / "test").glob("shard-*.tar"):
        tar.rename(tar.with_name(f"{int(tar.stem.split('-')[1])}.tar"))
    (reference / "test" / "nshards.txt").write_text("4\n")
    rc, err, expected = _eval(run_cli, reference, tmp_path / "ref.json")
    assert rc == 0, err

    pattern = "{split}/shard-{000..003}.tar"
    rc, err, local = _eval(run_cli, patterned_root, tmp_path / "local.json", "--shard_pattern", pattern)
    assert rc == 0, err
    base, seen = serve(patterned_root.parent)
    url = f"{base}/{patterned_root.name}"
    rc, err, remote = _eval(run_cli, url, tmp_path / "remote.json", "--shard_pattern", pattern)
    assert rc == 0, err
    assert local["metrics"] == expected["metrics"] == remote["metrics"]
    assert _rows(tmp_path / "remote.json") == _rows(tmp_path / "local.json") == _rows(tmp_path / "ref.json")
    assert remote["robust"]["dataset_source"]["shard_pattern"] == pattern
    assert [seen[("GET", f"/data/test/shard-{i:03d}.tar")] for i in range(4)] == [1, 1, 1, 1]
    assert no_subprocess == []

    # metadata local, shards named by absolute URLs
    rc, err, mixed = _eval(run_cli, patterned_root, tmp_path / "mixed.json", "--shard_pattern", f"{url}/{pattern}")
    assert rc == 0, err
    assert mixed["metrics"] == expected["metrics"]


def test_expand_shard_pattern():
    local = DataRoot.parse("/data/ds")
    assert expand_shard_pattern(local, "{split}/{0..2}.tar", "val") == [f"/data/ds/val/{i}.tar" for i in range(3)]
    assert expand_shard_pattern(local, "/other/{split}-{a,b}.tar", "test") == ["/other/test-a.tar", "/other/test-b.tar"]
    remote = DataRoot.parse("https://host/ds/")
    assert expand_shard_pattern(remote, "{split}/s-{00..01}.tar", "test") == [
        "https://host/ds/test/s-00.tar", "https://host/ds/test/s-01.tar",
    ]
    with pytest.raises(DatasetError, match=r"must contain \{split\}"):
        expand_shard_pattern(local, "test/{0..2}.tar", "test")
    with pytest.raises(DatasetError, match="--allow_pipe_urls"):
        expand_shard_pattern(local, "pipe:cat /x/{split}.tar", "test")
    assert expand_shard_pattern(local, "pipe:cat /x/{split}.tar", "test", allow_pipe=True) == ["pipe:cat /x/test.tar"]


def test_data_root_parsing():
    hf = DataRoot.parse("https://huggingface.co/datasets/clip-benchmark/wds_cars/tree/main")
    assert hf.metadata("test", "nshards.txt") == "https://huggingface.co/datasets/clip-benchmark/wds_cars/raw/main/test/nshards.txt"
    assert hf.shard("test", "0.tar") == "https://huggingface.co/datasets/clip-benchmark/wds_cars/resolve/main/test/0.tar"
    assert DataRoot.parse("file:///data/ds").metadata("groups.json") == "/data/ds/groups.json"
    with pytest.raises(DatasetError, match="not supported"):
        DataRoot.parse("s3://bucket/ds")
    with pytest.raises(DatasetError, match="cannot be a dataset root"):
        DataRoot.parse("pipe:curl -s https://host/ds")
    assert is_remote_root("https://host/x") and is_remote_root("pipe:cat x") and is_remote_root("s3://b/x")
    assert not is_remote_root("/data/x") and not is_remote_root("file:///data/x")


def _one_error_line(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip_benchmark_robust: error: "), err
    return lines[0]


def test_pipe_urls_are_refused_unless_opted_in(run_cli, shapes_root, tmp_path, no_subprocess):
    pattern = f"pipe:cat {shlex.quote(str(shapes_root))}/{{split}}/0.tar"
    rc, err, _ = _eval(run_cli, shapes_root, tmp_path / "a.json", "--shard_pattern", pattern)
    line = _one_error_line(rc, err)
    assert "pipe:" in line and "--allow_pipe_urls" in line
    rc, err, _ = _eval(run_cli, "pipe:cat /etc/passwd", tmp_path / "b.json")
    assert "cannot be a dataset root" in _one_error_line(rc, err)
    rc, err, _ = _eval(run_cli, "pipe:cat /etc/passwd", tmp_path / "c.json", "--allow_pipe_urls")
    assert "cannot be a dataset root" in _one_error_line(rc, err)
    assert no_subprocess == []
    assert not list(tmp_path.glob("*.json"))


def test_pipe_shards_run_when_opted_in(run_cli, shapes_root, tmp_path):
    rc, err, expected = _eval(run_cli, shapes_root, tmp_path / "ref.json")
    assert rc == 0, err
    pattern = f"pipe:cat {shlex.quote(str(shapes_root))}/{{split}}/0.tar"
    rc, err, piped = _eval(run_cli, shapes_root, tmp_path / "pipe.json", "--shard_pattern", pattern, "--allow_pipe_urls")
    assert rc == 0, err
    assert piped["metrics"] == expected["metrics"]


def test_remote_failures_name_the_url(run_cli, shapes_root, serve, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shapes_root, served / "data")
    (served / "data" / "test" / "0.tar").unlink()
    base, _ = serve(served)
    rc, err, _ = _eval(run_cli, f"{base}/data", tmp_path / "a.json")
    line = _one_error_line(rc, err)
    assert f"{base}/data/test/0.tar" in line and "404" in line
    rc, err, _ = _eval(run_cli, f"{base}/nothing", tmp_path / "b.json")
    assert f"{base}/nothing/groups.json" in _one_error_line(rc, err)
    with pytest.raises(DatasetError, match="cannot fetch"):  # nothing listens on port 9 of localhost
        GroupedShards("http://127.0.0.1:9/data")


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_more_workers_than_shards_same_metrics_and_order(run_cli, shapes_root, tmp_path):
    assert len(GroupedShards(shapes_root).shard_paths("test")) == 1
    rc, err, single = _eval(run_cli, shapes_root, tmp_path / "w0.json")
    assert rc == 0, err
    rc, err, many = _eval(run_cli, shapes_root, tmp_path / "w3.json", "--num_workers", "3")
    assert rc == 0, err
    assert many["metrics"] == single["metrics"]
    rows = _rows(tmp_path / "w3.json")
    assert rows == _rows(tmp_path / "w0.json") and len(rows) == 32
