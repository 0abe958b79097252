"""The methods' own figures, found next to the results JSONs: ``<results>_<method>_<name>.png`` written by
``eval --plot`` (CFR's curve, ...) and RaVL's discovery sheets (``discover --output X.json`` writes ``X.png``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .load import Run, is_discovery_report, short


@dataclass(frozen=True)
class Figure:
    """A PNG to show in a section: what it is and where it came from."""

    caption: str
    path: str
    name: str  # the file name it gets in the report directory

    def read(self) -> bytes:
        return Path(self.path).read_bytes()


def _base(path: str) -> str:
    return path[: -len(".json")] if path.endswith(".json") else path


def method_figures(run: Run, slug: str) -> list[Figure]:
    """Every ``<results>_<method>_<name>.png`` beside ``run``'s results JSON."""
    base = Path(_base(run.path))
    out = []
    for method in run.methods:
        for png in sorted(base.parent.glob(f"{base.name}_{method}_*.png")):
            name = png.name[len(f"{base.name}_{method}_"): -len(".png")]
            if any(png.name.startswith(f"{base.name}_{other}_") for other in run.methods
                   if other != method and other.startswith(method + "_")):
                continue  # belongs to a method whose name extends this one's (dfr_train vs dfr)
            out.append(Figure(f"{method}: {name} ({short(run.path)}, seed {run.seed})", str(png),
                              f"{slug}_{len(out) + 1}_{method}_{name}.png"))
    return out


def discovery_sheets(runs: list[Run], slug: str) -> list[Figure]:
    """RaVL discovery sheets in the runs' directories whose report names the runs' dataset, model and pretrained."""
    wanted = {(r.dataset, r.model, r.pretrained) for r in runs}
    out = []
    for directory in dict.fromkeys(Path(r.path).parent for r in runs):
        for report in sorted(directory.glob("*.json")):
            try:
                doc = json.loads(report.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # not ours to judge: the results JSONs were checked when loaded
            sheet = Path(_base(str(report)) + ".png")
            key = (doc.get("dataset"), doc.get("model"), doc.get("pretrained")) if isinstance(doc, dict) else None
            if is_discovery_report(doc) and key in wanted and sheet.is_file():
                out.append(Figure(f"RaVL discovery sheet ({short(str(report))}, split {doc.get('split')})",
                                  str(sheet), f"{slug}_discovery_{len(out) + 1}.png"))
    return out
