"""``write_report``: read and check every input, render everything in memory, then write all-or-nothing."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from ..atomic import write_files
from .load import load_runs
from .plots import section_pngs
from .render import markdown, page
from .tables import LONG_COLUMNS, build_sections, long_rows

LONG_CSV = "results_long.csv"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _csv_value(value):
    # csv writes floats with repr(), which reads back as the same float: values equal the JSON's.
    return "" if value is None else value


def write_report(inputs: Sequence[str], output_dir: str) -> list[str]:
    """Write results_long.csv, report.md, report.html and the PNG plots into ``output_dir``; returns their paths."""
    runs = load_runs(inputs)
    sections = build_sections(runs)
    rows = long_rows(runs)
    images: dict[str, bytes] = {}
    for section in sections:
        images.update(section_pngs(section))
    md = markdown(sections, runs)
    html = page(sections, runs, images)

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
