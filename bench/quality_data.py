"""In-memory copy of the ISIC folder for fast model research (bench/quality_explore.py).

Loads every image once at a reduced size (cached as .npy under $SKIN_BENCH_CACHE,
default /tmp/skin-quality-cache) and splits it into train/validation/test with the
product's grouped, stratified split (:func:`split`: the functions ``skin stage`` runs).
Until 2026-11-28 this module had its own grouping (thumbnail correlation >= 0.97, or
>= 0.85 for same-class files numbered at most 2 apart) and its own split; explore rows
in BENCHMARKS.md from before then were measured on that split.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from skin.data.images import file_number

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "skin-cancer-isic" / "train"
CACHE = Path(os.environ.get("SKIN_BENCH_CACHE", "/tmp/skin-quality-cache"))
CLASSES = ("benign", "malignant")


def list_files(data: Path = DATA) -> list[tuple[Path, int]]:
    out = []
    for label, cls in enumerate(CLASSES):
        files = sorted((data / cls).glob("*.jpg"),
                       key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
        out += [(p, label) for p in files]
    return out


def load(size: int, data: Path = DATA) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """(uint8 images [N,size,size,3], int labels [N], paths); cached."""
    files = list_files(data)
    CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(("|".join(str(p) for p, _ in files) + str(size)).encode()).hexdigest()[:10]
    cache = CACHE / f"images-{size}-{key}.npy"
    labels = np.array([lab for _, lab in files], dtype=np.int64)
    if cache.exists():
        return np.load(cache), labels, [p for p, _ in files]
    imgs = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, (p, _) in enumerate(files):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
            imgs[i] = np.asarray(im)
    np.save(cache, imgs)
    return imgs, labels, [p for p, _ in files]


def split(paths: list[Path], labels: np.ndarray, seed: int) -> np.ndarray:
    """0 train, 1 validation, 2 test per image: the product's grouped, stratified split.

    The functions ``skin stage`` runs, with the default experiment's ``data`` settings
    (``validation_fraction``, ``test_fraction``, ``near_duplicate_correlation``) and
    ``seed`` as ``data.seed``: thumbnails from :func:`skin.data.images.prepare_image`, groups
    from :func:`skin.data.grouping.near_duplicate_groups`, whole groups to a split with
    :func:`skin.data.grouping.split_images`. (Stage also drops exact duplicates and unusable
    files first and lists files in path order, so its split of the same folder can differ
    in a few groups.) The thumbnails are cached beside the images.
    """
    from skin.data.grouping import SPLITS, near_duplicate_groups, split_images
    from skin.infra.config import DEFAULT_EXPERIMENT_FILE, load_experiment

    d = load_experiment(DEFAULT_EXPERIMENT_FILE, env={}).data
    thumbs = _thumbs(paths)
    lab = [int(v) for v in labels]
    group, _ = near_duplicate_groups(thumbs, lab, [file_number(p) for p in paths],
                                     [p.parent.name for p in paths],
                                     d.near_duplicate_correlation, seed)
    fractions = {"validation": d.validation_fraction, "test": d.test_fraction}
    fractions["train"] = 1.0 - sum(fractions.values())
    part = {name: k for k, name in enumerate(SPLITS)}  # train 0, validation 1, test 2
    return np.array([part[s] for s in split_images(group, lab, fractions, seed)], np.int64)


def _thumbs(paths: list[Path]) -> np.ndarray:
    from skin.data.images import prepare_image

    key = hashlib.sha1("|".join(str(p) for p in paths).encode()).hexdigest()[:10]
    cache = CACHE / f"thumbs-{key}.npy"
    if cache.exists():
        return np.load(cache)
    thumbs = np.stack([prepare_image(p.read_bytes()).thumb for p in paths])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(cache, thumbs)
    return thumbs


if __name__ == "__main__":
    import time

    t = time.time()
    for s in (32, 64, 96, 128):
        x, y, paths = load(s)
        print(s, x.shape, f"{time.time() - t:.1f}s")
    sp = split(paths, y, 0)
    for k in range(3):
        print(k, (sp == k).sum(), y[sp == k].mean().round(3), f"{time.time() - t:.1f}s")
