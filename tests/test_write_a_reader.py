"""The "Write a reader" guide in docs/datasets.md: its reader is the example plugin's photos.py, and it runs."""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_robust_plugins import DatasetError, DatasetRequest, FileDataset

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "crp-example-plugin" / "crp_example_plugin" / "photos.py"


def guide_code() -> str:
    text = (ROOT / "docs" / "datasets.md").read_text()
    section = text[text.index("## Write a reader"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture()
def photos(monkeypatch):
    """The guide's module, loaded from its file (as the installed example plugin would import it)."""
    spec = importlib.util.spec_from_file_location("crp_guide_photos", PHOTOS)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def write_photos(root: Path, rows: list[tuple[str, str, str, str]], table="photos.csv") -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["file,class,place,split", *(",".join(r) for r in rows)]
    (root / table).write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())  # as Excel writes it
    for i, (file, *_) in enumerate(rows):
        buf = io.BytesIO()
        Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)).save(buf, format="JPEG")
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_bytes(buf.getvalue())


def test_the_guide_shows_the_example_reader_unchanged_and_it_is_short():
    assert guide_code() == PHOTOS.read_text()
    assert len(PHOTOS.read_text().splitlines()) <= 45


def test_the_guide_reader_loads_a_csv_with_exact_counts(photos, tmp_path):
    rows = [("img/cat 1.jpg", "cat", "indoor", "train"), ("img/cat2.jpg", "cat", "indoor", "0"),
            ("img/dog1.jpg", "dog", "outdoor", "train"), ("img/dog2.jpg", "dog", "indoor", "test"),
            ("img/cat3.jpg", "cat", "outdoor", "2")]
    write_photos(tmp_path, rows)
    ds = photos.load(DatasetRequest(str(tmp_path)))
    assert isinstance(ds, FileDataset) and ds.splits() == ("train", "test")
    # groups y * 2 + a: (cat, indoor), (cat, outdoor), (dog, indoor), (dog, outdoor)
    assert list(ds.schema.counts("train")) == [2, 0, 0, 1] and list(ds.schema.counts("test")) == [0, 1, 1, 0]
    key, image, fields = ds.samples("test", None)[0]
    assert image.size == (6, 6) and fields.tolist() in ([1, 1], [0, 1])
    config = photos.PhotosConfig(table="other.csv")
    write_photos(tmp_path / "b", rows[:2], table="other.csv")
    assert list(photos.load(DatasetRequest(str(tmp_path / "b"), config=config)).schema.counts("train")) == [2, 0, 0, 0]


def test_the_guide_reader_names_bad_rows(photos, tmp_path):
    write_photos(tmp_path, [("img/a.jpg", "cat", "indoor", "train"), ("img/b.jpg", "horse", "indoor", "train")])
    with pytest.raises(DatasetError, match=r"photos\.csv line 3: column 'class': 'horse' is not one of \['cat', 'dog'\]"):
        photos.load(DatasetRequest(str(tmp_path)))
