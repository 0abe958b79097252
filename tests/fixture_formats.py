"""Tiny datasets in the exact published formats, written by the tests (no downloads).

Each writer uses the real file names, column names and value conventions of its
format, creates rows and files in a shuffled order (so readers cannot lean on the
filesystem's or the table's order), and returns what it wrote so tests can compare
group counts with the reader's.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from clip_robust_plugins.datasets.spurious_shapes import render_sample

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

#: the 40 attribute names of list_attr_celeba, in the file's order
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def tiny_image(rng: np.random.Generator, fmt: str = "JPEG", size: int = 8) -> bytes:
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def shapes_image(rng: np.random.Generator, y: int, a: int, fmt: str = "PNG") -> bytes:
    """A 32-px spurious_shapes rendering (square/diamond on land/water): the tiny model reads it."""
    pixels, _ = render_sample(rng, y, a, 32)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def _expand(counts: dict[str, list[int]]) -> list[tuple[str, int]]:
    """(split, group) for every sample of per-split group counts."""
    return [(split, g) for split, per_group in counts.items() for g, n in enumerate(per_group) for _ in range(n)]


# ------------------------------------------------------------------------ Waterbirds
WATERBIRDS_COUNTS = {"train": [6, 2, 1, 5], "val": [2, 2, 1, 1], "test": [3, 3, 2, 2]}
_SPECIES = {0: ("094.White_breasted_Nuthatch", "White_Breasted_Nuthatch"), 1: ("001.Black_footed_Albatross", "Black_Footed_Albatross")}
_PLACES = {0: "/b/bamboo_forest/{:08d}.jpg", 1: "/o/ocean/{:08d}.jpg"}


def write_waterbirds(root: Path, counts=WATERBIRDS_COUNTS, seed: int = 0, columns=None) -> list[dict]:
    """group_DRO's release: ``metadata.csv`` (img_id,img_filename,y,split,place,place_filename) + JPEGs."""
    rng = np.random.default_rng(seed)
    samples = _expand(counts)
    rows = []
    for i, (split, g) in enumerate(samples):
        y, place = divmod(g, 2)
        folder, stem = _SPECIES[y]
        rows.append({
            "img_id": str(i + 1),
            "img_filename": f"{folder}/{stem}_{i:04d}_{100 + i}.jpg",
            "y": str(y),
            "split": str(SPLIT_CODE[split]),
            "place": str(place),
            "place_filename": _PLACES[place].format(i),
        })
    order = rng.permutation(len(rows))
    for j in order:
        path = root / rows[j]["img_filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny_image(rng))
    columns = columns or ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for j in order:
            writer.writerow(rows[j])
    return rows


# ---------------------------------------------------------------------------- CelebA
CELEBA_COUNTS = {"train": [5, 4, 3, 1], "val": [2, 2, 1, 1], "test": [3, 2, 2, 1]}


def write_celeba(root: Path, variant: str = "txt", counts=CELEBA_COUNTS, seed: int = 0, nested: bool = False) -> dict:
    """CelebA's annotation files (``.txt`` originals or the ``.csv`` variants) + ``img_align_celeba/`` JPEGs.

    Groups are ``Blond_Hair * 2 + Male``; every other attribute is random -1/1.
    Returns ``{image_id: (split, {attribute: -1/1})}``.
    """
    rng = np.random.default_rng(seed)
    samples = _expand(counts)
    samples = [samples[j] for j in rng.permutation(len(samples))]
    table = {}
    for i, (split, g) in enumerate(samples):
        values = {a: int(v) for a, v in zip(CELEBA_ATTRIBUTES, rng.choice([-1, 1], len(CELEBA_ATTRIBUTES)))}
        blond, male = divmod(g, 2)
        values["Blond_Hair"], values["Male"] = 2 * blond - 1, 2 * male - 1
        table[f"{i + 1:06d}.jpg"] = (split, values)
    image_dir = root / "img_align_celeba"
    if nested:
        image_dir = image_dir / "img_align_celeba"
    image_dir.mkdir(parents=True)
    for image_id in rng.permutation(sorted(table)):
        (image_dir / str(image_id)).write_bytes(tiny_image(rng))
    ids = sorted(table)
    if variant == "txt":
        lines = [str(len(ids)), " ".join(CELEBA_ATTRIBUTES) + " "]
        lines += [f"{i} " + " ".join(f"{table[i][1][a]:2d}" for a in CELEBA_ATTRIBUTES) for i in ids]
        (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (root / "list_eval_partition.txt").write_text("".join(f"{i} {SPLIT_CODE[table[i][0]]}\n" for i in ids))
    else:
        with open(root / "list_attr_celeba.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_id", *CELEBA_ATTRIBUTES])
            writer.writerows([i, *(table[i][1][a] for a in CELEBA_ATTRIBUTES)] for i in ids)
        with open(root / "list_eval_partition.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_id", "partition"])
            writer.writerows([i, SPLIT_CODE[table[i][0]]] for i in ids)
    return table


# ------------------------------------------------------------------------ SubpopBench
SUBPOP_CLASSES = ["cat", "dog", "bird"]
SUBPOP_ATTRIBUTES = ["indoor", "outdoor"]
SUBPOP_COUNTS = {"train": [4, 1, 1, 3, 2, 0], "val": [1, 1, 1, 1, 1, 1], "test": [2, 2, 1, 2, 1, 1]}


def write_subpop(root: Path, counts=SUBPOP_COUNTS, seed: int = 0, sidecar: bool = True) -> list[dict]:
    """A SubpopBench table (``filename,y,a,split`` with pandas' unnamed index column first) + PNGs,
    and the sidecar ``metadata.names.json`` with the class and attribute names."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (split, g) in enumerate(_expand(counts)):
        y, a = divmod(g, len(SUBPOP_ATTRIBUTES))
        rows.append({"": str(i), "filename": f"images/{SUBPOP_CLASSES[y]}/{i:05d}.png", "y": str(y), "a": str(a),
                     "split": str(SPLIT_CODE[split])})
    order = rng.permutation(len(rows))
    for j in order:
        path = root / rows[j]["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny_image(rng, "PNG"))
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["", "filename", "y", "a", "split"])
        writer.writeheader()
        writer.writerows(rows[j] for j in order)
    if sidecar:
        (root / "metadata.names.json").write_text(json.dumps({"classnames": SUBPOP_CLASSES, "attributes": SUBPOP_ATTRIBUTES}))
    return rows


# ---------------------------------------------------------------------- image folders
#: per split, counts of (class folder, attribute folder); SpuCo names the val split "valid"
FOLDER_COUNTS = {
    "train": {("square", "land"): 6, ("square", "water"): 1, ("diamond", "land"): 1, ("diamond", "water"): 6},
    "valid": {("square", "land"): 3, ("square", "water"): 3, ("diamond", "land"): 3, ("diamond", "water"): 3},
    "test": {("square", "land"): 4, ("square", "water"): 4, ("diamond", "land"): 4, ("diamond", "water"): 4},
}


def write_imagefolder(root: Path, counts=FOLDER_COUNTS, seed: int = 0) -> dict:
    """``split/class/attribute/*.png`` with spurious_shapes renderings, created in shuffled order."""
    rng = np.random.default_rng(seed)
    files = [
        (split, cls, attr, i)
        for split, per in counts.items() for (cls, attr), n in per.items() for i in range(n)
    ]
    for j in rng.permutation(len(files)):
        split, cls, attr, i = files[j]
        path = root / split / cls / attr / f"{cls}_{attr}_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(shapes_image(rng, ("square", "diamond").index(cls), ("land", "water").index(attr)))
    return counts


def _write_files(paths: list[Path], rng: np.random.Generator, fmt: str, size: int = 8) -> None:
    """Tiny images at ``paths``, created in a shuffled order."""
    for j in rng.permutation(len(paths)):
        paths[j].parent.mkdir(parents=True, exist_ok=True)
        paths[j].write_bytes(tiny_image(rng, fmt, size))


# ------------------------------------------------------------------------- Spawrious
SPAWRIOUS_CLASSES = ("bulldog", "corgi", "dachshund", "labrador")
SPAWRIOUS_LOCATIONS = ("desert", "jungle", "dirt", "mountain", "snow", "beach")


def spawrious_folder_size(env: int, location: str, cls: str) -> int:
    """Images the fixture puts in ``{env}/{location}/{cls}``: 10 to 12, so limits of 8 to 10 bind."""
    return 10 + (env + SPAWRIOUS_LOCATIONS.index(location) + SPAWRIOUS_CLASSES.index(cls)) % 3


def write_spawrious(root: Path, seed: int = 0) -> dict[str, int]:
    """The full release: ``spawrious224/{0|1}/{location}/{class}/{n}.png`` (every folder of both
    environments); returns ``{"env/location/class": image count}``."""
    rng = np.random.default_rng(seed)
    sizes, paths = {}, []
    for env in (0, 1):
        for loc in SPAWRIOUS_LOCATIONS:
            for cls in SPAWRIOUS_CLASSES:
                n = spawrious_folder_size(env, loc, cls)
                sizes[f"{env}/{loc}/{cls}"] = n
                paths += [root / "spawrious224" / str(env) / loc / cls / f"{i}.png" for i in range(n)]
    _write_files(paths, rng, "PNG", 4)
    return sizes


# -------------------------------------------------------------------------- MetaShift
METASHIFT_COUNTS = {"train/cat/cat(indoor)": 7, "train/dog/dog(outdoor)": 9, "test/cat/cat(outdoor)": 4,
                    "test/dog/dog(indoor)": 5}


def write_metashift(root: Path, counts=METASHIFT_COUNTS, seed: int = 0) -> dict[str, int]:
    """SubpopBench's MetaShift download: ``MetaShift-Cat-Dog-indoor-outdoor/{train,test}/{cat,dog}/...``
    with Visual Genome style ``<id>.jpg`` names."""
    rng = np.random.default_rng(seed)
    base = root / "MetaShift-Cat-Dog-indoor-outdoor"
    paths = [base / folder / f"{2300000 + 37 * k + i}.jpg" for k, (folder, n) in enumerate(counts.items())
             for i in range(n)]
    _write_files(paths, rng, "JPEG")
    return counts


# ------------------------------------------------------------------------ ImageNet-9
IN9_CLASSES = ("00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore", "05_insect",
               "06_musical instrument", "07_primate", "08_fish")
IN9_VARIANTS = ("original", "mixed_same", "mixed_rand", "mixed_next", "only_fg", "no_fg", "only_bg_b", "only_bg_t")


def in9_size(variant: str, cls: str) -> int:
    return 1 + (IN9_VARIANTS.index(variant) + IN9_CLASSES.index(cls)) % 2


def write_imagenet9(root: Path, variants=IN9_VARIANTS, seed: int = 0) -> None:
    """The released ``bg_challenge``: ``{variant}/val/{NN_class}/{wnid}_{n}.JPEG``."""
    rng = np.random.default_rng(seed)
    paths = [root / v / "val" / c / f"n0{2084071 + k}_{i}.JPEG" for v in variants for k, c in enumerate(IN9_CLASSES)
             for i in range(in9_size(v, c))]
    _write_files(paths, rng, "JPEG")


# ---------------------------------------------------------------------- CounterAnimal
#: class folder -> (common background, counter background, images common, images counter)
COUNTERANIMAL_FOLDERS = {
    "34 leatherback turtle": ("water", "sand", 3, 2),
    "80 black grouse": ("grass", "snow", 2, 4),
    "296 ice bear": ("snow", "grass", 4, 1),
}


def write_counteranimal(root: Path, seed: int = 0) -> None:
    """``LAION-final/{id} {name}/{common|counter}-{background}/{n}.jpg``."""
    rng = np.random.default_rng(seed)
    paths = []
    for folder, (common, counter, n_common, n_counter) in COUNTERANIMAL_FOLDERS.items():
        base = root / "LAION-final" / folder
        paths += [base / f"common-{common}" / f"{i}.jpg" for i in range(n_common)]
        paths += [base / f"counter-{counter}" / f"{i}.jpg" for i in range(n_counter)]
    _write_files(paths, rng, "JPEG")
