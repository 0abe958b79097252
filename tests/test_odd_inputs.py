"""A corpus of real-world odd inputs: what a user's data can contain is read, the rest stops the run
in one line naming the file or sample (exit 2 through the CLI, no results written)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_robust_plugins import DatasetError, DatasetRequest
from clip_robust_plugins.datasets.imagefolder import load_imagefolder
from clip_robust_plugins.datasets.waterbirds import load_waterbirds
from clip_robust_plugins.readers import FileRow, SkippedSample, open_image

HEADER = "img_id,img_filename,y,split,place\n"
TINY = ["--model", "crp-tiny", "--pretrained", "spurious_shapes", "--num_workers", "0", "--no_feature_cache",
        "--no_amp"]


# ------------------------------------------------------------------------- writers
def rgb(size=(8, 8), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_16bit_rgb(w: int = 8, h: int = 8) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL does not write these; cameras and scanners do)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    pixels = np.random.default_rng(1).integers(0, 65536, (h, w, 3), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encoded(rgb((12, 8)), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [rgb(seed=i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


#: images a real user's data contains; each must decode to an RGB image of its stored size
GOOD_IMAGES = {
    "palette.png": lambda: encoded(rgb().convert("P"), "PNG", transparency=0),
    "gray_alpha.png": lambda: encoded(rgb().convert("LA"), "PNG"),
    "rgba.png": lambda: encoded(rgb().convert("RGBA"), "PNG"),
    "cmyk.jpg": lambda: encoded(rgb().convert("CMYK"), "JPEG"),
    "gray16.png": lambda: encoded(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 900), "PNG"),
    "one_bit.png": lambda: encoded(rgb().convert("1"), "PNG"),
    "rgb16.png": png_16bit_rgb,
    "gray.jpg": lambda: encoded(rgb().convert("L"), "JPEG"),
    "progressive.jpg": lambda: encoded(rgb(), "JPEG", progressive=True, optimize=True),
    "rotated.jpg": exif_rotated_jpeg,
    "animated.gif": animated_gif,
    "UPPER.JPEG": lambda: encoded(rgb(), "JPEG"),
}
#: files that are not usable images: reading one is a one-line error naming it
BAD_IMAGES = {
    "truncated.jpg": lambda: encoded(rgb((32, 32)), "JPEG")[:300],
    "empty.png": lambda: b"",
    "not_an_image.png": lambda: b"<html>404 Not Found</html>\n",
    "bomb.png": bomb_png,
}


def write_csv(root: Path, lines: list[str], *, encoding="utf-8", newline="\n", bom=False, images=True) -> Path:
    """group_DRO's metadata.csv from ``lines`` (after the header), with the images it names."""
    root.mkdir(parents=True, exist_ok=True)
    text = (HEADER + "".join(line + "\n" for line in lines)).replace("\n", newline)
    (root / "metadata.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    if images:
        import csv

        for row in csv.DictReader(io.StringIO(HEADER + "\n".join(lines))):
            path = root / row["img_filename"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoded(rgb(), "JPEG"))
    return root


def lines(names: list[str], y=None) -> list[str]:
    """One test-split row per file name, alternating groups."""
    return [f"{i},{n},{(i // 2) % 2 if y is None else y},2,{i % 2}" for i, n in enumerate(names)]


def keys_and_values(ds, split="test") -> list[tuple[str, tuple[int, ...]]]:
    return [(r.key, r.values) for r in ds.rows(split)]


# ------------------------------------------------------------------- CSV: must work
@pytest.mark.parametrize("variant", ["bom", "crlf", "trailing_blank_lines", "bom_crlf"])
def test_csv_encodings_and_line_endings_read_the_same_rows(tmp_path, variant):
    names = [f"birds/{i}.jpg" for i in range(4)]
    plain = load_waterbirds(DatasetRequest(str(write_csv(tmp_path / "plain", lines(names)))))
    root = tmp_path / variant
    if variant == "trailing_blank_lines":
        write_csv(root, [*lines(names), "", "", ""])
    else:
        write_csv(root, lines(names), bom="bom" in variant, newline="\r\n" if "crlf" in variant else "\n")
    ds = load_waterbirds(DatasetRequest(str(root)))
    assert keys_and_values(ds) == keys_and_values(plain) and len(ds.rows("test")) == 4


def test_latin1_csv_is_read_with_a_note(tmp_path, capsys):
    names = ["birds/café.jpg", "birds/señal.jpg", "birds/plain.jpg", "birds/über.jpg"]
    write_csv(tmp_path, lines(names), encoding="latin-1")
    ds = load_waterbirds(DatasetRequest(str(tmp_path)))
    assert sorted(Path(r.path).name for r in ds.rows("test")) == sorted(Path(n).name for n in names)
    assert all(os.path.isfile(r.path) for r in ds.rows("test"))
    err = capsys.readouterr().err
    assert "metadata.csv is not UTF-8" in err and "Windows-1252" in err


def test_quoted_cells_spaces_and_unicode_in_paths(tmp_path):
    names = ['"birds/a, b/1.jpg"', "birds/with space 2.jpg", "鳥/ögon fågel.jpg", "birds/x.y.z.jpg"]
    write_csv(tmp_path, lines(names))
    ds = load_waterbirds(DatasetRequest(str(tmp_path)))
    paths = sorted(os.path.relpath(r.path, tmp_path) for r in ds.rows("test"))
    assert paths == sorted(n.strip('"') for n in names)
    keys = [r.key for r in ds.rows("test")]
    assert len(set(keys)) == 4 and not any("." in k or "/" in k for k in keys)
    data = ds.samples("test", None)
    assert [data[i][1].size for i in range(len(data))] == [(8, 8)] * 4


# --------------------------------------------------------------- CSV: must fail
@pytest.mark.parametrize("case,rows,message", [
    ("duplicate key", ["0,birds/a.jpg,0,2,0", "1,birds/a.png,1,2,1"], r"duplicate sample key 'birds%2Fa'"),
    ("non-integer label", ["0,birds/a.jpg,yes,2,0"], r"metadata\.csv line 2: column 'y': 'yes' is not an integer"),
    ("float label", ["0,birds/a.jpg,1.0,2,0"], r"line 2: column 'y': '1\.0' is not an integer"),
    ("label out of range", ["0,birds/a.jpg,0,2,0", "1,birds/b.jpg,2,2,0"], r"line 3: column 'y': value 2 is out of range"),
    ("negative place", ["0,birds/a.jpg,0,2,-1"], r"line 2: column 'place': value -1 is out of range"),
    ("empty filename", ["0,,0,2,0"], r"line 2: column 'img_filename' is empty"),
    ("too many cells", ["0,birds/a.jpg,0,2,0,extra"], r"line 2: more values than header columns"),
    ("no rows", [], r"robust/waterbirds found no samples"),
])
def test_bad_metadata_is_one_line_naming_the_file(tmp_path, case, rows, message):
    write_csv(tmp_path, rows, images=case not in ("empty filename", "too many cells"))
    with pytest.raises(DatasetError, match=message) as info:
        load_waterbirds(DatasetRequest(str(tmp_path)))
    assert "\n" not in str(info.value) and (str(tmp_path) in str(info.value))


def test_duplicated_header_column_is_an_error(tmp_path):
    tmp_path.joinpath("metadata.csv").write_text("img_filename,y,split,place,y\nbirds/a.jpg,0,2,0,1\n")
    with pytest.raises(DatasetError, match="column 'y' appears twice"):
        load_waterbirds(DatasetRequest(str(tmp_path)))


# ----------------------------------------------------------------- images: must work
@pytest.mark.parametrize("name", list(GOOD_IMAGES))
def test_real_world_image_files_decode(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(GOOD_IMAGES[name]())
    image = open_image(FileRow("k", str(path), (0,), where="test"))
    stored = Image.open(path).size
    assert image.convert("RGB").size == stored  # EXIF orientation is not applied (as torchvision reads)
    if name == "rotated.jpg":
        assert stored == (12, 8)


def write_folder(root: Path, files: dict[str, bytes]) -> None:
    """robust/imagefolder's ``split/class/attribute/file`` layout."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_odd_images_hidden_files_and_symlinks_evaluate_end_to_end(run_cli, tmp_path):
    root = tmp_path / "data"
    files = {f"test/square/land/{n}": make() for n, make in GOOD_IMAGES.items()}
    files.update({f"test/diamond/water/{i}.png": encoded(rgb(seed=i), "PNG") for i in range(3)})
    files["test/diamond/water/._3.png"] = b"\x00\x05\x16\x07 AppleDouble"  # macOS resource fork: skipped
    files["test/square/land/.DS_Store"] = b"\x00\x00\x00\x01Bud1"
    write_folder(root, files)
    outside = tmp_path / "shared" / "linked.png"
    outside.parent.mkdir()
    outside.write_bytes(encoded(rgb(), "PNG"))
    os.symlink(outside, root / "test" / "diamond" / "water" / "linked.png")  # linked in from shared storage
    ds = load_imagefolder(DatasetRequest(str(root)))
    # square/water and diamond/land are groups with zero samples
    assert list(ds.schema.counts("test")) == [0, 4, len(GOOD_IMAGES), 0]
    out = tmp_path / "res.json"
    rc, _, err = run_cli("eval", "--dataset", "robust/imagefolder", "--dataset_root", root, *TINY, "--output", out)
    assert rc == 0, err
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["zeroshot/group_count/y:square_a:land"] == len(GOOD_IMAGES)
    assert metrics["zeroshot/group_count/y:square_a:water"] == 0


# --------------------------------------------------------------- images: must fail
@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_unusable_image_is_a_skipped_sample_naming_the_file(tmp_path, name):
    write_folder(tmp_path, {f"test/c/a/{name}": BAD_IMAGES[name](), "test/c/a/ok.png": encoded(rgb(), "PNG")})
    ds = load_imagefolder(DatasetRequest(str(tmp_path)))
    items = [ds.ordered_samples("test", None)[i] for i in range(2)]
    skipped = [item for item in items if isinstance(item, SkippedSample)]
    assert len(skipped) == 1 and name in skipped[0].reason and "\n" not in skipped[0].reason


@pytest.mark.parametrize("case", ["truncated.jpg", "empty.png", "not_an_image.png", "bomb.png", "dangling symlink",
                                  "missing split", "duplicate key", "label out of range", "missing image"])
def test_through_the_cli_bad_input_is_exit_2_one_line_nothing_written(run_cli, tmp_path, case):
    root = tmp_path / "data"
    split = "test"
    if case in BAD_IMAGES or case in ("dangling symlink", "missing split"):
        files = {f"test/c{i}/a/{i}.png": encoded(rgb(seed=i), "PNG") for i in range(2)}
        if case in BAD_IMAGES:
            files[f"test/c0/a/{case}"] = BAD_IMAGES[case]()
        write_folder(root, files)
        if case == "dangling symlink":
            os.symlink(tmp_path / "gone.png", root / "test" / "c1" / "a" / "gone.png")
        split = "val" if case == "missing split" else "test"
        argv = ["--dataset", "robust/imagefolder", "--dataset_root", root]
    else:
        rows = {"duplicate key": ["0,b/a.jpg,0,2,0", "1,b/a.png,1,2,1"],
                "label out of range": ["0,b/a.jpg,0,2,0", "1,b/b.jpg,3,2,1"],
                "missing image": ["0,b/a.jpg,0,2,0", "1,b/b.jpg,1,2,1"]}[case]
        write_csv(root, rows)
        if case == "missing image":
            (root / "b" / "b.jpg").unlink()
        argv = ["--dataset", "robust/waterbirds", "--dataset_root", root]
    out = tmp_path / "res.json"
    rc, stdout, err = run_cli("eval", *argv, "--split", split, *TINY, "--output", out)
    lines_ = [line for line in err.splitlines() if "error" in line]
    assert rc == 2, err
    assert len(lines_) == 1 and "Traceback" not in err, err
    expected = {"dangling symlink": "gone.png", "missing split": "no split 'val'", "duplicate key": "b%2Fa",
                "label out of range": "value 3 is out of range", "missing image": "b.jpg"}.get(case, case)
    assert expected in lines_[0]
    assert not out.exists() and not list(tmp_path.glob("res*"))
