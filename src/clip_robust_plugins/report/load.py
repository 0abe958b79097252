"""Finding, reading and validating results JSONs; splitting their flat keys into methods and metrics."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvalError

#: dataset metadata this package writes next to shards; skipped when scanning directories
SKIPPED_NAMES = ("groups.json",)
#: the ``format`` of a RaVL discovery report JSON (``discover --output``)
DISCOVERY_FORMAT = "clip_robust_plugins.ravl_discovery/"
_INTERVAL = re.compile(r"^(?P<head>[^/]*?)_ci_(?P<side>low|high)(?P<tail>/.*)?$")


@dataclass(frozen=True)
class Run:
    """One results JSON: what it evaluated and its flat metrics."""

    path: str
    dataset: str
    model: str
    pretrained: str
    seed: Any
    split: str
    groups: tuple[str, ...]
    methods: tuple[str, ...]  # baseline first
    baseline: str
    metrics: dict[str, Any]
    intervals: dict[str, Any] | None
    #: each method's settings as recorded (``robust.methods.<m>.settings``; None: not recorded)
    settings: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    #: the dataset's own settings (a generated dataset's generator config, a reader's options), if recorded
    dataset_settings: dict[str, Any] | None = None
    #: mixed precision (``robust.amp``), None where not recorded
    amp: bool | None = None
    #: the command line that made the run (``robust.command_line``), None where not recorded
    command_line: tuple[str, ...] | None = None

    @property
    def evaluated(self) -> tuple[str, tuple[str, ...], str]:
        """What the run measured; runs of one dataset that differ here are never averaged."""
        return self.split, self.groups, canonical(self.dataset_settings)

    def identity(self, method: str) -> tuple[str, str, str, str, str]:
        """What ``method`` did in this run, up to the seed: runs equal here are averaged over seeds."""
        return self.model, self.pretrained, method, canonical(self.settings.get(method)), canonical(self.amp)

    def method_metrics(self, method: str) -> dict[str, Any]:
        """``method``'s metrics with the ``<method>/`` prefix removed."""
        prefix = method + "/"
        owner = {m for m in self.methods if m != method and m.startswith(prefix)}  # a method named "a/b" beside "a"
        out = {}
        for key, value in self.metrics.items():
            if key.startswith(prefix) and not any(key.startswith(o + "/") for o in owner):
                out[key[len(prefix):]] = value
        return out


def find_results(inputs: Iterable[str]) -> list[str]:
    """The results JSON paths named by ``inputs``: files as given, directories searched recursively
    for ``*.json`` (hidden files and ``groups.json`` skipped).  Each path once, in input order."""
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            hits = sorted(
                str(p) for p in path.rglob("*.json")
                if p.is_file() and p.name not in SKIPPED_NAMES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not hits:
                raise EvalError(f"{item}: no results JSON files in this directory")
            found += hits
        elif path.is_file():
            found.append(str(path))
        else:
            raise EvalError(f"{item}: no such file or directory")
    return list(dict.fromkeys(found))


def _need(doc: dict, path: str, dotted: str, kind: type | tuple[type, ...]) -> Any:
    value: Any = doc
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise EvalError(f"{path}: not a clip_benchmark_robust results JSON (no {dotted!r})")
        value = value[part]
    if not isinstance(value, kind):
        raise EvalError(f"{path}: not a clip_benchmark_robust results JSON ({dotted!r} is a {type(value).__name__})")
    return value


def _read(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def is_discovery_report(doc: Any) -> bool:
    """A RaVL ``discover`` report (shown as a figure beside the runs, not read as a run)."""
    return isinstance(doc, dict) and str(doc.get("format", "")).startswith(DISCOVERY_FORMAT)


def load_run(path: str, doc: Any = None) -> Run:
    """Read and validate one results JSON; a file that is unreadable or of another kind raises EvalError."""
    if doc is None:
        doc = _read(path)
    if not isinstance(doc, dict):
        raise EvalError(f"{path}: not a clip_benchmark_robust results JSON (not a JSON object)")
    for key in ("dataset", "model", "pretrained"):
        _need(doc, path, key, str)
    metrics = _need(doc, path, "metrics", dict)
    methods = _need(doc, path, "robust.methods", dict)
    baseline = _need(doc, path, "robust.baseline", str)
    split = _need(doc, path, "robust.split", str)
    groups = _need(doc, path, "robust.groups", list)
    if not methods or baseline not in methods:
        raise EvalError(f"{path}: not a clip_benchmark_robust results JSON (baseline {baseline!r} not among its methods)")
    order = [baseline] + [m for m in methods if m != baseline]
    for method in order:
        if not any(k.startswith(method + "/") for k in metrics):
            raise EvalError(f"{path}: method {method!r} has no metrics")
    robust = doc["robust"]
    intervals = robust.get("intervals")
    command = robust.get("command_line")
    command_line = tuple(str(a) for a in command) if isinstance(command, list) else None
    amp = robust.get("amp")
    return Run(
        path=path, dataset=doc["dataset"], model=doc["model"], pretrained=doc["pretrained"],
        seed=robust.get("seed"), split=split, groups=tuple(str(g) for g in groups),
        methods=tuple(order), baseline=baseline, metrics=metrics,
        intervals=intervals if isinstance(intervals, dict) else None,
        settings={m: _settings(methods[m], m, command_line) for m in order},
        dataset_settings=_dataset_settings(robust.get("dataset_source")),
        amp=amp if isinstance(amp, bool) else None,
        command_line=command_line,
    )


def _settings(info: Any, method: str, command: tuple[str, ...] | None) -> dict[str, Any] | None:
    """A method's settings, flattened to dotted keys: the values of its option dataclass as recorded
    (``robust.methods.<m>.settings``); for a method that declares none, the ``--<method>_*`` flags
    of the recorded command line; None when neither is recorded (older files)."""
    settings = info.get("settings") if isinstance(info, dict) else None
    if isinstance(settings, dict):
        return flatten(settings)
    return command_flags(command, method) if command is not None else None


def command_flags(command: tuple[str, ...], method: str) -> dict[str, Any]:
    """The ``--<method>_<key> value...`` flags of a command line as ``{key: "value"}`` (True for a bare flag);
    a flag the command did not give is absent (it took its default)."""
    prefix = f"--{method}_"
    out: dict[str, Any] = {}
    i = 0
    while i < len(command):
        token = command[i]
        i += 1
        if not token.startswith(prefix):
            continue
        key, eq, value = token[len(prefix):].partition("=")
        if eq:
            out[key] = value
            continue
        values = []
        while i < len(command) and not command[i].startswith("--"):
            values.append(command[i])
            i += 1
        out[key] = " ".join(values) if values else True
    return out


def _dataset_settings(source: Any) -> dict[str, Any] | None:
    """The settings that make a dataset what it is: a generator's config or a reader's options (never paths)."""
    if not isinstance(source, dict):
        return None
    generator = source.get("generator")
    if isinstance(generator, dict) and isinstance(generator.get("config"), dict):
        return flatten(generator["config"])
    options = source.get("options")
    return flatten(options) if isinstance(options, dict) and options else None


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def canonical(value: Any) -> str:
    """A stable text form of recorded settings, for grouping (``"null"`` when unknown)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def load_runs(inputs: Iterable[str]) -> list[Run]:
    """Every results JSON named by ``inputs``, validated before anything is written (RaVL discovery
    reports among them are skipped: the page shows their sheets beside the runs of their directory)."""
    inputs = list(inputs)
    runs = []
    for path in find_results(inputs):
        doc = _read(path)
        if not is_discovery_report(doc):
            runs.append(load_run(path, doc))
    if not runs:
        raise EvalError(f"{', '.join(inputs)}: no results JSON of `eval` among the inputs (only RaVL discovery reports)")
    return runs


def interval_of(key: str) -> tuple[str, str] | None:
    """``(base metric, "low" | "high")`` when ``key`` is an interval key, else None."""
    match = _INTERVAL.match(key)
    if match is None:
        return None
    return match["head"] + (match["tail"] or ""), match["side"]


def split_intervals(metrics: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    """``{metric: (value, ci_low, ci_high)}``: interval keys folded into the metric they belong to."""
    out: dict[str, list[Any]] = {}
    folded: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        parsed = interval_of(key)
        if parsed is not None and parsed[0] in metrics:
            folded.setdefault(parsed[0], {})[parsed[1]] = value
        else:
            out[key] = [value, None, None]
    for key, sides in folded.items():
        out[key][1], out[key][2] = sides.get("low"), sides.get("high")
    return {k: tuple(v) for k, v in out.items()}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def short(path: str) -> str:
    """A path as the report shows it: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
