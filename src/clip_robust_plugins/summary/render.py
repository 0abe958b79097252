"""report.md and the self-contained report.html, from the same sections."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from .load import Run, short
from .tables import Section

TITLE = "Group-robustness report"
CELL_NOTE = ("Cells: mean ± std (sample standard deviation) over the seeds where a row has several runs; "
             "otherwise the run's value and its interval [low, high]. Bold: best in the column.")


def _levels(runs: Sequence[Run]) -> str:
    levels = sorted({r.intervals.get("ci_level") for r in runs if r.intervals and r.intervals.get("ci_level")})
    if not levels:
        return ""
    return "Intervals: " + ", ".join(f"{lv:.0%}" for lv in levels) + \
        " (Wilson per group; percentile bootstrap within groups, paired with the baseline for the differences)."


def _table(section: Section) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    header = ["model", "pretrained", "method", "runs (seeds)"] + [c.title for c in section.columns]
    best = {c.title: section.best(c) for c in section.columns}
    rows = []
    for i, row in enumerate(section.rows):
        seeds = ", ".join(str(s) for s in row.seeds)
        cells = [(row.model, False), (row.pretrained, False), (row.method, False), (f"{len(row.runs)} ({seeds})", False)]
        cells += [(row.stats[c.title].text(), i in best[c.title]) for c in section.columns]
        rows.append(cells)
    return header, rows


def _md_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if bold and text != "-" else text


def markdown(sections: Sequence[Section], runs: Sequence[Run]) -> str:
    lines = [f"# {TITLE}", "", f"{len(runs)} results file(s). {CELL_NOTE} {_levels(runs)}".rstrip(), ""]
    for section in sections:
        header, rows = _table(section)
        lines += [f"## {section.title}", "", "Groups: " + ", ".join(section.groups), ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["--:"] * (len(header) - 3)) + "|")
        lines += ["| " + " | ".join(_md_cell(t, b) for t, b in row) + " |" for row in rows]
        lines.append("")
        lines += [f"![worst-group accuracy]({section.slug}_worst_group.png)", "",
                  f"![worst-group vs average accuracy]({section.slug}_worst_vs_average.png)", ""]
        if section.notes:
            lines += ["Notes:", "", *(f"- {n}" for n in section.notes), ""]
    lines += ["## Files", "", "| file | dataset | model | pretrained | seed | split | methods |", "|---|---|---|---|--:|---|---|"]
    for run in runs:
        lines.append(f"| {short(run.path)} | {run.dataset} | {run.model} | {run.pretrained} | {run.seed} | "
                     f"{run.split} | {', '.join(run.methods)} |")
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:0.3em 0.6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
.note{color:#555;font-size:0.9em}"""


def page(sections: Sequence[Section], runs: Sequence[Run], images: dict[str, bytes]) -> str:
    """One self-contained HTML file: the tables, the notes and the PNGs embedded as base64."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{TITLE}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{TITLE}</h1>",
           f"<p class=\"note\">{len(runs)} results file(s). {esc(CELL_NOTE)} {esc(_levels(runs))}</p>"]
    for section in sections:
        header, rows = _table(section)
        out += [f"<h2>{esc(section.title)}</h2>", f"<p class=\"note\">Groups: {esc(', '.join(section.groups))}</p>",
                "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
        for row in rows:
            cells = []
            for j, (text, bold) in enumerate(row):
                body = f"<strong>{esc(text)}</strong>" if bold and text != "-" else esc(text)
                cells.append(f"<td class=\"num\">{body}</td>" if j >= 3 else f"<td>{body}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
        for name in (f"{section.slug}_worst_group.png", f"{section.slug}_worst_vs_average.png"):
            data = base64.b64encode(images[name]).decode("ascii")
            out.append(f"<p><img alt=\"{esc(name)}\" src=\"data:image/png;base64,{data}\"></p>")
        if section.notes:
            out.append("<ul class=\"note\">" + "".join(f"<li>{esc(n)}</li>" for n in section.notes) + "</ul>")
    out += ["<h2>Files</h2>", "<table><tr><th>file</th><th>dataset</th><th>model</th><th>pretrained</th><th>seed</th>"
            "<th>split</th><th>methods</th></tr>"]
    for run in runs:
        cells = [short(run.path), run.dataset, run.model, run.pretrained, str(run.seed), run.split, ", ".join(run.methods)]
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    out += ["</table>", "</body></html>"]
    return "\n".join(out) + "\n"
