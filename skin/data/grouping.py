"""Which images show the same lesion, and a split that keeps each lesion on one side.

    group, stats = near_duplicate_groups(thumbs, labels, numbers, folders, 0.97, seed)
    split = split_images(group, labels, {"train": .7, "validation": .15, "test": .15}, seed)
    fold = fold_groups(train_group_labels, 4, seed)   # folds of the train split (skin.staging.stage)

Pure numpy, no I/O: :mod:`skin.staging.stage` computes the thumbnails (``prepare_image``)
and file numbers, calls these two and writes the shards; bench/quality_data.py
splits its in-memory copy of the images the same way. The ISIC archive holds several photos of
one lesion (the dataset's README); a split that put them on both sides would
score a model on images it has nearly seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from skin.data.images import CLASSES

SPLITS = ("train", "validation", "test")
ADJACENT_MAX_GAP = 3  # file numbers at most this far apart count as neighbours
ADJACENT_FLOOR = 0.80  # never link neighbours below this correlation
_PAIR_SAMPLE = 200_000


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[max(ra, rb)] = min(ra, rb)
        return True


def near_duplicate_groups(thumbs: np.ndarray, labels: list[int], numbers: list[int | None],
                          folders: list[str], threshold: float, seed: int
                          ) -> tuple[list[int], dict[str, Any]]:
    """Group images that probably show the same lesion; returns (group per image, stats).

    ``thumbs`` holds one zero-mean, unit-norm 32x32 grayscale thumbnail per
    row, so a dot product is the Pearson correlation of two thumbnails.
    Two kinds of evidence link two images (union-find, so links chain):

    1. **Any pair** whose correlation is >= ``threshold``
       (``data.near_duplicate_correlation``): visually the same picture.
    2. **Neighbouring file numbers** in the same folder (numbers at most
       ``ADJACENT_MAX_GAP`` apart): the ISIC archive exported several photos
       of one lesion under consecutive numbers (the README's malignant run
       300-330). Such a pair is far likelier to be one lesion than a random
       pair, so it needs less visual evidence, but still some: it is linked
       when its correlation exceeds what *unrelated* images of the same
       folder reach about once among as many comparisons. That level is the
       ``1 - 1/k`` quantile (k = number of neighbour pairs) of the
       correlations of same-folder pairs that are not neighbours (all of
       them, or a seeded sample), kept within [``ADJACENT_FLOOR``,
       ``threshold``]. So by chance alone we expect about one wrong
       neighbour link, whatever the data set's size.

    Linking too much only moves images together (a coarser split), never
    leaks; so chains are accepted, and the largest group is reported.
    """
    n = len(thumbs)
    uf = _UnionFind(n)
    stats: dict[str, Any] = {"threshold": threshold}
    pairs = 0
    block = 1024
    for start in range(0, n, block):
        sims = thumbs[start:start + block] @ thumbs.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c > i:
                pairs += 1
                uf.union(i, c)
    stats["similar_pairs"] = pairs

    neighbours = []
    order = sorted((folders[i], labels[i], numbers[i], i) for i in range(n)
                   if numbers[i] is not None)
    for (f1, l1, n1, i), (f2, l2, n2, j) in zip(order, order[1:]):
        if f1 == f2 and l1 == l2 and 0 < n2 - n1 <= ADJACENT_MAX_GAP:
            neighbours.append((i, j))
    stats["neighbour_pairs"] = len(neighbours)
    linked = 0
    if neighbours and n > 2:
        sample = _unrelated_pair_correlations(thumbs, labels, numbers, folders, seed)
        q = 1.0 - 1.0 / len(neighbours)
        level = float(np.quantile(sample, q)) if len(sample) >= 10 else threshold
        adjacent_threshold = min(threshold, max(ADJACENT_FLOOR, level))
        stats["neighbour_threshold"] = round(adjacent_threshold, 4)
        for i, j in neighbours:
            if float(thumbs[i] @ thumbs[j]) >= adjacent_threshold and uf.union(i, j):
                linked += 1
    stats["neighbour_links"] = linked

    roots: dict[int, int] = {}
    group = []
    for i in range(n):
        group.append(roots.setdefault(uf.find(i), len(roots)))
    sizes = np.bincount(np.asarray(group, dtype=np.int64), minlength=len(roots)) \
        if n else np.zeros(0, np.int64)
    members: dict[int, set[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, set()).add(labels[i])
    mixed = sum(1 for labs in members.values() if len(labs) > 1)
    stats.update(groups=len(roots), groups_with_several=int((sizes > 1).sum()),
                 images_in_groups=int(sizes[sizes > 1].sum()),
                 largest_group=int(sizes.max()) if n else 0, groups_with_both_labels=mixed)
    return group, stats


def _unrelated_pair_correlations(thumbs: np.ndarray, labels: list[int],
                                 numbers: list[int | None], folders: list[str], seed: int
                                 ) -> np.ndarray:
    """Correlations of image pairs from the same folder that are not numbered neighbours.

    The null distribution for the neighbour rule: like with like (same class,
    same folder, so the same kind of picture), minus the pairs under test.
    Every such pair when there are few, else a seeded sample of ``_PAIR_SAMPLE``.
    """
    members: dict[tuple[str, int], list[int]] = {}
    for i, key in enumerate(zip(folders, labels)):
        members.setdefault(key, []).append(i)
    total = sum(len(m) * (len(m) - 1) // 2 for m in members.values())
    rng = np.random.default_rng(seed)
    first_parts, second_parts = [], []
    for m in members.values():
        idx = np.asarray(m)
        if len(idx) < 2:
            continue
        if total <= _PAIR_SAMPLE:
            a, b = np.triu_indices(len(idx), 1)
        else:
            k = max(1, round(_PAIR_SAMPLE * (len(idx) * (len(idx) - 1) / 2) / total))
            a, b = rng.integers(0, len(idx), k), rng.integers(0, len(idx), k)
            keep = a != b
            a, b = a[keep], b[keep]
        first_parts.append(idx[a])
        second_parts.append(idx[b])
    if not first_parts:
        return np.zeros(0, np.float32)
    first, second = np.concatenate(first_parts), np.concatenate(second_parts)
    num = np.asarray([np.nan if x is None else x for x in numbers], dtype=np.float64)
    neighbour = np.abs(num[first] - num[second]) <= ADJACENT_MAX_GAP  # NaN compares False
    first, second = first[~neighbour], second[~neighbour]
    out = np.empty(len(first), np.float32)
    step = 16_384  # bounded memory: two step x 1024 float32 blocks at a time
    for start in range(0, len(first), step):
        sl = slice(start, start + step)
        out[sl] = np.einsum("ij,ij->i", thumbs[first[sl]], thumbs[second[sl]])
    return out


def split_groups(group_labels: list[list[int]], fractions: dict[str, float], seed: int
                 ) -> list[str]:
    """Assign whole groups to splits, stratified by label; returns the split per group.

    ``group_labels[g]`` is the per-class image count of group g. Groups are
    placed largest first (seeded random order among equal sizes), each into
    the split whose per-class quota it fills best: the split maximising
    ``sum_c count_c * (quota[split][c] - placed[split][c]) / quota[split][c]``,
    i.e. the one furthest behind, relatively, on the classes the group holds.
    This is iterative stratification with groups as the unit; with many small
    groups every split ends within a group of its quota for each class.
    """
    splits = [s for s in SPLITS if fractions.get(s, 0) > 0]
    return _stratify(group_labels, splits, [fractions[s] for s in splits], seed)


def fold_groups(group_labels: list[list[int]], folds: int, seed: int) -> list[int]:
    """Assign whole groups to ``folds`` folds of equal size, stratified by label (the same
    placement as :func:`split_groups`); returns the fold (0..folds-1) per group."""
    return _stratify(group_labels, list(range(folds)), [1.0 / folds] * folds, seed)


def _stratify(group_labels: list[list[int]], names: list, fractions: list[float], seed: int
              ) -> list:
    counts = np.asarray(group_labels, dtype=np.float64).reshape(len(group_labels), len(CLASSES))
    totals = counts.sum(axis=0)
    quota = [np.maximum(totals * f, 1e-9) for f in fractions]
    placed = [np.zeros(len(CLASSES)) for _ in names]
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(len(group_labels))
    order = sorted(range(len(group_labels)), key=lambda g: (-counts[g].sum(), tiebreak[g]))
    out: list = [None] * len(group_labels)
    for g in order:
        best, best_score = 0, -np.inf
        for k in range(len(names)):
            score = float((counts[g] * (quota[k] - placed[k]) / quota[k]).sum())
            if score > best_score + 1e-12:
                best, best_score = k, score
        out[g] = names[best]
        placed[best] += counts[g]
    return out


def split_images(group: list[int], labels: list[int], fractions: dict[str, float], seed: int
                 ) -> list[str]:
    """The split of each image when whole groups are placed by :func:`split_groups`.

    ``group[i]`` and ``labels[i]`` belong to image i; the groups are the distinct
    values of ``group``, in sorted order (which fixes the seeded tie-break).
    """
    groups = sorted(set(group))
    index = {g: k for k, g in enumerate(groups)}
    group_labels = [[0] * len(CLASSES) for _ in groups]
    for g, label in zip(group, labels):
        group_labels[index[g]][label] += 1
    chosen = split_groups(group_labels, fractions, seed)
    return [chosen[index[g]] for g in group]
