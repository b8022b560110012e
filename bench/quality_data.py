"""In-memory copy of the ISIC folder for fast model research (bench/quality_explore.py).

Loads every image once at a reduced size (cached as .npy under $SKIN_BENCH_CACHE,
default /tmp/skin-quality-cache), groups near-duplicates the way the issue asks and
makes a seeded, grouped, stratified train/validation/test split. Not used by the
product: the product's staging is skin/stage.py.

Grouping: two images are one lesion when their 32x32 grayscale thumbnails correlate
>= ``corr`` (0.97), or when they are in the same class, their file numbers differ by
at most ``adjacent`` (2) and their thumbnails correlate >= ``adjacent_corr`` (0.85).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "skin-cancer-isic" / "train"
CACHE = Path(os.environ.get("SKIN_BENCH_CACHE", "/tmp/skin-quality-cache"))
CLASSES = ("benign", "malignant")


def list_files(data: Path = DATA) -> list[tuple[Path, int]]:
    out = []
    for label, cls in enumerate(CLASSES):
        files = sorted((data / cls).glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
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


def groups(paths: list[Path], labels: np.ndarray, corr: float = 0.97, adjacent: int = 2,
           adjacent_corr: float = 0.85) -> np.ndarray:
    """Group id per image (union-find over near-duplicate pairs)."""
    thumbs = load(32)[0].astype(np.float32)
    g = thumbs @ np.array([0.299, 0.587, 0.114], np.float32)
    g = g.reshape(len(g), -1)
    g = g - g.mean(1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True) + 1e-6
    c = g @ g.T
    parent = list(range(len(paths)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i, j):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    ii, jj = np.nonzero(np.triu(c >= corr, 1))
    for i, j in zip(ii, jj):
        union(i, j)
    nums = np.array([int(p.stem) if p.stem.isdigit() else -10**9 for p in paths])
    for i in range(len(paths)):
        for j in range(i + 1, min(i + 1 + adjacent, len(paths))):
            if labels[i] == labels[j] and abs(nums[i] - nums[j]) <= adjacent and c[i, j] >= adjacent_corr:
                union(i, j)
    return np.array([find(i) for i in range(len(paths))])


def split(labels: np.ndarray, group: np.ndarray, seed: int, test: float = 0.15,
          val: float = 0.15) -> np.ndarray:
    """0 train, 1 validation, 2 test per image; grouped, stratified by the group's majority label."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), dtype=np.int64)
    uniq = np.unique(group)
    glab = {u: int(round(labels[group == u].mean())) for u in uniq}
    for lab in (0, 1):
        gs = [u for u in uniq if glab[u] == lab]
        rng.shuffle(gs)
        n = sum((group == u).sum() for u in gs)
        acc = 0
        for u in gs:
            size = (group == u).sum()
            if acc < test * n:
                out[group == u] = 2
            elif acc < (test + val) * n:
                out[group == u] = 1
            acc += size
    return out


if __name__ == "__main__":
    import time
    t = time.time()
    for s in (32, 64, 96, 128):
        x, y, paths = load(s)
        print(s, x.shape, f"{time.time() - t:.1f}s")
    gr = groups(paths, y)
    sizes = np.bincount(np.unique(gr, return_inverse=True)[1])
    print("groups", len(sizes), "images in multi-image groups", sizes[sizes > 1].sum(), "largest", sizes.max())
    sp = split(y, gr, 0)
    for k in range(3):
        print(k, (sp == k).sum(), y[sp == k].mean().round(3))
