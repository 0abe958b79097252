"""``write_report``: read and check every input, render everything in memory, then write all-or-nothing."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Sequence

from ..atomic import write_files
from .figures import Figure, discovery_sheets, method_figures
from .load import load_runs
from .plots import section_pngs
from .render import markdown, page, section_runs
from .tables import LONG_COLUMNS, build_sections, long_rows

LONG_CSV = "results_long.csv"


class ReportWarning(UserWarning):
    """Something in the inputs the reader of the report should know (a run counted twice)."""


REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _csv_value(value):
    # csv writes floats with repr(), which reads back as the same float: values equal the JSON's.
    return "" if value is None else value


def write_report(inputs: Sequence[str], output_dir: str, warn: Callable[[str], None] | None = None) -> list[str]:
    """Write results_long.csv, report.md, report.html and the PNG plots into ``output_dir``; returns their paths.

    ``warn`` receives each warning (a run counted twice); by default they are Python warnings.
    """
    runs = load_runs(inputs)
    sections = build_sections(runs)
    for note in (n for section in sections for n in section.notes if n.startswith("warning: ")):
        if warn is None:
            warnings.warn(note[len("warning: "):], ReportWarning, stacklevel=2)
        else:
            warn(note)
    rows = long_rows(runs)
    images: dict[str, bytes] = {}
    extras: dict[str, list[Figure]] = {}
    for section in sections:
        images.update(section_pngs(section))
        members = section_runs(section)
        extras[section.slug] = [f for run in members for f in method_figures(run, section.slug)]
        extras[section.slug] += discovery_sheets(members, section.slug)
        images.update({f.name: f.read() for f in extras[section.slug]})
    md = markdown(sections, runs, extras)
    html = page(sections, runs, images, extras)

    def write_csv(path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(LONG_COLUMNS)
            writer.writerows([_csv_value(v) for v in row] for row in rows)

    def write_text(text: str):
        def write(path: str) -> None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)

        return write

    def write_bytes(data: bytes):
        def write(path: str) -> None:
            with open(path, "wb") as fh:
                fh.write(data)

        return write

    targets = [(os.path.join(output_dir, LONG_CSV), write_csv),
               (os.path.join(output_dir, REPORT_MD), write_text(md)),
               (os.path.join(output_dir, REPORT_HTML), write_text(html))]
    targets += [(os.path.join(output_dir, name), write_bytes(data)) for name, data in images.items()]
    return write_files(targets)
