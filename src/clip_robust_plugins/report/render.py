"""report.md and the self-contained report.html, from the same sections."""

from __future__ import annotations

import base64
import html
import shlex
from collections.abc import Sequence

from .figures import Figure
from .load import Run, short
from .plots import figure_names
from .tables import Section, Stat

TITLE = "Group-robustness report"
CELL_NOTE = ("Cells: mean ± std (sample standard deviation) over the seeds where a row has several runs; "
             "otherwise the run's value and its interval [low, high]. Bold: best in the column. A row is one "
             "method with one set of settings: runs are averaged only when they differ in nothing but the seed.")
GAP_NOTE = ("Two gaps, two names: gap (sample mean - worst) = acc - worst-group acc; gap (train-weighted - worst) = "
            "acc_train_weighted - worst-group acc (group accuracies weighted by the training split's group sizes).")


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
        cells = [(row.model, False), (row.pretrained, False), (row.name, False), (f"{len(row.runs)} ({seeds})", False)]
        cells += [(row.stats[c.title].text(), i in best[c.title]) for c in section.columns]
        rows.append(cells)
    return header, rows


def section_runs(section: Section) -> list[Run]:
    """The section's runs, each once, in the order they were given."""
    return list({id(r): r for row in section.rows for r in row.runs}.values())


def command_text(run: Run) -> str:
    return shlex.join(run.command_line) if run.command_line else "(not recorded: a results JSON from an older version)"


def _md_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if bold and text != "-" else text


def _group_header(section: Section) -> list[str]:
    return [f"{g} (n={section.counts[g]})" if g in section.counts else g for g in section.groups]


def markdown(sections: Sequence[Section], runs: Sequence[Run], extras: dict[str, list[Figure]]) -> str:
    lines = [f"# {TITLE}", "", f"{len(runs)} results file(s). {CELL_NOTE} {_levels(runs)}".rstrip(), "", GAP_NOTE, ""]
    for section in sections:
        header, rows = _table(section)
        lines += [f"## {section.title}", "", "Groups: " + ", ".join(section.groups), "", "### Leaderboard", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["--:"] * (len(header) - 3)) + "|")
        lines += ["| " + " | ".join(_md_cell(t, b) for t, b in row) + " |" for row in rows]
        lines += ["", "### Accuracy per group", "", "| method | " + " | ".join(_group_header(section)) + " |",
                  "|---|" + "--:|" * len(section.groups)]
        for row in section.rows:
            lines.append(f"| {_md_cell(section.display(row), False)} | "
                         + " | ".join(row.groups[g].text() for g in section.groups) + " |")
        lines.append("")
        for name, alt in figure_names(section):
            lines += [f"![{alt}]({name})", ""]
        for figure in extras.get(section.slug, []):
            lines += [f"![{figure.caption}]({figure.name})", "", f"*{figure.caption}*", ""]
        if section.notes:
            lines += ["Notes:", "", *(f"- {n}" for n in section.notes), ""]
        lines += ["### Commands", ""]
        for run in section_runs(section):
            lines += [f"{short(run.path)} (seed {run.seed}):", "", "    " + command_text(run), ""]
    lines += ["## Files", "", "| file | dataset | model | pretrained | seed | split | methods |", "|---|---|---|---|--:|---|---|"]
    for run in runs:
        lines.append(f"| {short(run.path)} | {run.dataset} | {run.model} | {run.pretrained} | {run.seed} | "
                     f"{run.split} | {', '.join(run.methods)} |")
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:80em;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:0.3em 0.6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
td.heat{text-align:center;font-variant-numeric:tabular-nums}td.heat small{color:#333}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all;font-size:0.85em}
figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}
.note{color:#555;font-size:0.9em}"""


def _heat(stat: Stat) -> str:
    """A group-accuracy cell: coloured from red (0) to green (1), the interval in the cell and on hover."""
    if not stat.values:
        return '<td class="heat" title="no value">-</td>'
    value = stat.mean
    hue = int(round(120 * min(max(value, 0.0), 1.0)))
    if stat.n > 1:
        detail, hover = f"± {stat.std:.3f}", f"mean {value:.3f} ± {stat.std:.3f} (std over {stat.n} runs)"
    elif stat.has_interval:
        detail, hover = f"[{stat.low:.3f}, {stat.high:.3f}]", f"{value:.3f}, interval [{stat.low:.3f}, {stat.high:.3f}]"
    else:
        detail, hover = "", f"{value:.3f}"
    return (f'<td class="heat" style="background:hsl({hue},65%,80%)" title="{html.escape(hover)}">{value:.3f}'
            + (f"<br><small>{html.escape(detail)}</small>" if detail else "") + "</td>")


def _img(name: str, data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _section_html(section: Section, images: dict[str, bytes], extras: list[Figure]) -> list[str]:
    esc = html.escape
    header, rows = _table(section)
    out = [f'<h2 id="{esc(section.slug)}">{esc(section.title)}</h2>',
           f'<p class="note">Groups: {esc(", ".join(section.groups))}</p>', "<h3>Leaderboard</h3>",
           "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for j, (text, bold) in enumerate(row):
            body = f"<strong>{esc(text)}</strong>" if bold and text != "-" else esc(text)
            cells.append(f'<td class="num">{body}</td>' if j >= 3 else f"<td>{body}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</table>", "<h3>Accuracy per group</h3>",
            "<table><tr><th>method</th>" + "".join(f"<th>{esc(h)}</th>" for h in _group_header(section)) + "</tr>"]
    for row in section.rows:
        out.append(f"<tr><td>{esc(section.display(row))}</td>" + "".join(_heat(row.groups[g]) for g in section.groups)
                   + "</tr>")
    out.append("</table>")
    for name, alt in figure_names(section):
        out.append(f"<figure>{_img(name, images[name], alt)}</figure>")
    if extras:
        out.append("<h3>The methods' own figures</h3>")
        for figure in extras:
            out.append(f"<figure>{_img(figure.name, images[figure.name], figure.caption)}"
                       f"<figcaption>{esc(figure.caption)}</figcaption></figure>")
    if section.notes:
        out.append('<ul class="note">' + "".join(f"<li>{esc(n)}</li>" for n in section.notes) + "</ul>")
    out.append("<h3>Commands</h3>")
    for run in section_runs(section):
        out.append(f'<p class="note">{esc(short(run.path))} (seed {esc(str(run.seed))}):</p>'
                   f"<pre>{esc(command_text(run))}</pre>")
    return out


def page(sections: Sequence[Section], runs: Sequence[Run], images: dict[str, bytes],
         extras: dict[str, list[Figure]]) -> str:
    """One self-contained HTML file: the tables, the notes and the PNGs embedded as base64."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{TITLE}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{TITLE}</h1>",
           f"<p class=\"note\">{len(runs)} results file(s). {esc(CELL_NOTE)} {esc(_levels(runs))}</p>",
           f'<p class="note">{esc(GAP_NOTE)}</p>']
    if len(sections) > 1:
        out.append("<ul>" + "".join(f'<li><a href="#{esc(s.slug)}">{esc(s.title)}</a></li>' for s in sections) + "</ul>")
    for section in sections:
        out += _section_html(section, images, extras.get(section.slug, []))
    out += ["<h2>Files</h2>", "<table><tr><th>file</th><th>dataset</th><th>model</th><th>pretrained</th><th>seed</th>"
            "<th>split</th><th>methods</th></tr>"]
    for run in runs:
        cells = [short(run.path), run.dataset, run.model, run.pretrained, str(run.seed), run.split, ", ".join(run.methods)]
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    out += ["</table>", "</body></html>"]
    return "\n".join(out) + "\n"
