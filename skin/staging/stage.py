"""Stage: labelled images -> checked, deduplicated, grouped split -> TFRecord shards + manifest.

    report = stage(exp, storage)            # source: exp.data.source

Steps, in order:

1. **Source.** A folder holding ``benign/`` and ``malignant/``, a ``.zip`` of
   one, a ``gs://`` prefix (downloaded), or ``synthetic`` (generated into the
   work dir; the report says so). ``data.test_source`` (a separate folder) is
   staged as the test split when set (:mod:`skin.staging.sources`).
2. **Fingerprint and idempotence.** A hash over every file's relative path
   and sha256 plus the split settings. When ``<data>/manifest.json`` exists
   with the same fingerprint nothing is written (``already_staged``); with a
   different one staging stops with a :class:`DataError`: another source, or
   other settings, was already staged under this experiment name.
3. **Checks.** Every file is decoded with PIL (and once with TensorFlow's
   JPEG decoder, the one training uses). Empty, truncated, non-image, tiny or
   huge (decompression bomb, side > 8000 px) files are quarantined, copied
   untouched to ``<data>/quarantine/`` with the reason in the report. Images
   that are not RGB JPEG (PNG, alpha, grayscale, CMYK, palette...) are
   converted to RGB JPEG; images with a side over 1024 px are downscaled.
   Nothing else is resized: the pipeline resizes to the model's size
   (:func:`skin.data.images.prepare_image`, which serving runs too).
4. **Exact duplicates** (same sha256) are dropped, keeping one copy; the same
   bytes under both labels is a labelling conflict and every copy is
   quarantined.
5. **Near-duplicates** are grouped (:func:`skin.data.grouping.near_duplicate_groups`) and
6. **the split** assigns whole groups to train/validation/test, stratified by
   label (:func:`skin.data.grouping.split_groups`), so one lesion never sits on both sides.
   **Folds** of the training part (train + validation) for confirmation trials
   (skin.tuning.confirm): fold 0 is the validation split, folds 1..F-1 split the train
   split's groups into parts about the validation split's size, stratified
   (:func:`skin.data.grouping.fold_groups`); test images are in no fold (-1). Too few images
   for two such parts with both classes: no folds (``folds: 1``, train images -1).
7. **Write** ``<split>-<i>-of-<n>.tfrecord`` shards, the quarantine copies,
   ``stage_report.json``, and ``manifest.json`` last: its presence means the
   stage finished (:mod:`skin.staging.shards`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skin.data import provenance
from skin.data.grouping import SPLITS, fold_groups, near_duplicate_groups, split_images
from skin.data.images import CLASSES, UnusableImage, file_number, prepare_image, tf_decoder
from skin.errors import DataError
from skin.infra import artifacts
from skin.infra.config import Experiment
from skin.infra.storage import Storage, join
from skin.staging.shards import build_manifest, write_shards
from skin.staging.sources import resolve_source

log = logging.getLogger(__name__)

# Bump when a change here changes what a stage writes for the same input.
# 2: validation folds (the split itself is the same as under 1).
STAGE_ALGORITHM = 2
MAX_FOLDS = 10  # fold 0 (the validation split) plus at most 9 parts of the train split

_CHECK_THREADS = 4


# ---------------------------------------------------------------------------
# The report

@dataclass
class StageReport:
    """What a stage did; ``to_dict()`` is ``data/stage_report.json``."""

    data_uri: str
    source: str
    test_source: str = ""
    synthetic: bool = False
    provenance: dict[str, dict] = field(default_factory=dict)  # skin.data.provenance, by source
    already_staged: bool = False
    fingerprint: str = ""
    files: int = 0  # files found under the label folders
    usable: int = 0  # images in the shards
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    # counts per fold (0: the validation split); one entry: no folds; []: staged before them
    folds: list[dict[str, int]] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)  # dropped exact copies
    converted: list[dict] = field(default_factory=list)  # re-encoded (mode, format, size)
    quarantined: list[dict] = field(default_factory=list)  # unusable, with the reason
    held_out: list[dict] = field(default_factory=list)  # near-copies of test images
    ignored: list[str] = field(default_factory=list)  # hidden files, files outside label dirs
    near_duplicates: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        if self.already_staged:
            return (f"{self.data_uri} already staged from this source "
                    f"(fingerprint {self.fingerprint[:12]}); nothing written")
        counts = ", ".join(f"{s} {c['count']} ({c['benign']} benign, {c['malignant']} malignant)"
                           for s, c in self.splits.items() if c["count"])
        nd = self.near_duplicates
        return (f"{self.usable} of {self.files} images staged to {self.data_uri}: {counts}; "
                f"{len(self.duplicates)} exact duplicates dropped, {len(self.converted)} "
                f"converted, {len(self.quarantined)} quarantined, "
                f"{nd.get('groups_with_several', 0)} near-duplicate groups "
                f"({nd.get('images_in_groups', 0)} images) kept on one side of the split"
                + (f", {len(self.held_out)} near-copies of test images held out"
                   if self.held_out else "")
                + (f", {len(self.folds)} validation folds" if len(self.folds) > 1 else "")
                + (" [SYNTHETIC DATA]" if self.synthetic else "")
                + f" in {self.seconds:.1f} s")


# ---------------------------------------------------------------------------
# One image

@dataclass
class _Item:
    rel: str  # "benign/100.jpg" (test source: "test/benign/100.jpg")
    path: Path
    label: int
    origin: str  # "source" or "test"
    sha256: str = ""  # of the file as found
    number: int | None = None  # trailing integer of the file name
    reason: str = ""  # why it is quarantined ("" = usable)
    converted: str = ""  # why it was re-encoded
    stored: bytes | None = None  # re-encoded JPEG (None: the original bytes are stored)
    stored_sha256: str = ""
    width: int = 0
    height: int = 0
    thumb: np.ndarray | None = field(default=None, repr=False, compare=False)
    group: int = -1  # near-duplicate group
    fold: int = -1  # validation fold of the training part (-1: test, or no folds)
    shard: str = ""



def _scan(root: Path, origin: str, report: StageReport) -> list[_Item]:
    """Files under ``root/benign`` and ``root/malignant``, in a stable order."""
    missing = [c for c in CLASSES if not (root / c).is_dir()]
    if missing:
        raise DataError(f"{root}: no {' or '.join(m + '/' for m in missing)} folder; expected "
                        f"a folder holding benign/ and malignant/ image folders")
    prefix = "test/" if origin == "test" else ""
    for extra in sorted(root.iterdir()):
        if extra.name not in CLASSES and not extra.name.startswith("."):
            report.ignored.append(prefix + extra.name)
    items = []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).rglob("*")):
            rel = prefix + path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                report.ignored.append(rel)
                continue
            if path.is_dir():
                continue
            items.append(_Item(rel=rel, path=path, label=label, origin=origin,
                               number=file_number(path)))
    return items


def _hash_files(items: list[_Item]) -> None:
    def one(item: _Item) -> None:
        try:
            item.sha256 = hashlib.sha256(item.path.read_bytes()).hexdigest()
        except OSError as e:
            item.sha256 = "unreadable"
            item.reason = f"cannot be read ({e.strerror or e})"

    with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
        list(pool.map(one, items))


def _check(item: _Item, tf_decode) -> None:
    """Prepare one file; fill in the stored bytes and thumbnail, or a quarantine reason."""
    if item.reason:
        return
    try:
        data = item.path.read_bytes()
    except OSError as e:
        item.reason = f"cannot be read ({e.strerror or e})"
        return
    try:
        prepared = prepare_image(data, tf_decode)
    except UnusableImage as e:
        item.reason = str(e)
        return
    item.thumb = prepared.thumb
    item.width, item.height = prepared.width, prepared.height
    item.converted = prepared.converted
    item.stored = prepared.jpeg if prepared.converted else None
    item.stored_sha256 = (hashlib.sha256(prepared.jpeg).hexdigest() if prepared.converted
                          else item.sha256)



# ---------------------------------------------------------------------------
# The stage

def _fingerprint(items: list[_Item], exp: Experiment, algorithm: int | None = None) -> str:
    d = exp.data
    algorithm = STAGE_ALGORITHM if algorithm is None else algorithm
    settings = {"validation_fraction": d.validation_fraction, "test_fraction": d.test_fraction,
                "seed": d.seed, "shards": d.shards,
                "near_duplicate_correlation": d.near_duplicate_correlation,
                "test_source": bool(d.test_source), "algorithm": algorithm}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for rel, sha in sorted((i.rel, i.sha256) for i in items):
        h.update(f"{rel}\0{sha}\n".encode())
    return h.hexdigest()


def stage(exp: Experiment, storage: Storage, *, source: str | None = None,
          work_dir: str | os.PathLike | None = None) -> StageReport:
    """Stage ``source`` (default ``exp.data.source``) into ``exp.data_uri``.

    ``work_dir`` holds generated synthetic images and scratch files (default:
    the runtime's ``SKIN_WORK_DIR``/stage). Raises :class:`DataError` when
    nothing usable remains, a class is empty, a split cannot be filled, or
    other data was already staged under this experiment.
    """
    started = time.monotonic()
    source = source or exp.data.source
    if work_dir is None:
        from skin.infra.runtime import runtime_from_env

        work_dir = runtime_from_env().work_dir / "stage"
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_uri = exp.data_uri
    report = StageReport(data_uri=data_uri, source=source, test_source=exp.data.test_source)
    with tempfile.TemporaryDirectory(prefix="stage-", dir=work_dir) as tmp:
        scratch = Path(tmp)
        root, report.synthetic = resolve_source(source, storage, scratch, exp, work_dir,
                                                "source")
        items = _scan(root, "source", report)
        report.provenance["source"] = provenance.describe(
            source, root, synthetic=report.synthetic, licence=exp.data.licence)
        if exp.data.test_source:
            test_root, _ = resolve_source(exp.data.test_source, storage, scratch, exp,
                                          work_dir, "test_source")
            items += _scan(test_root, "test", report)
            report.provenance["test_source"] = provenance.describe(
                exp.data.test_source, test_root, licence=exp.data.licence)
        report.files = len(items)
        log.info("staging %d files from %s%s", len(items), source,
                 f" (+ test {exp.data.test_source})" if exp.data.test_source else "")
        _hash_files(items)
        report.fingerprint = _fingerprint(items, exp)

        manifest_uri = join(data_uri, artifacts.MANIFEST)
        if storage.exists(manifest_uri):
            existing = storage.read_json(manifest_uri)
            if existing.get("source_fingerprint") == _fingerprint(items, exp, algorithm=1):
                # the same images and split, staged before folds existed: kept as it is
                log.warning("%s was staged by an earlier version, without validation folds: "
                            "confirmation trials (search.confirm) will vary the seed only; "
                            "delete %s/ and stage again to add folds", data_uri, data_uri)
                report.fingerprint = existing["source_fingerprint"]
            if existing.get("source_fingerprint") == report.fingerprint:
                report.already_staged = True
                report.folds = list(existing.get("fold_counts", []))
                report.splits = {s: {k: v[k] for k in ("count", *CLASSES)}
                                 for s, v in existing.get("splits", {}).items()}
                report.usable = sum(v["count"] for v in report.splits.values())
                report.seconds = time.monotonic() - started
                log.info("%s", report.summary())
                return report
            raise DataError(
                f"{data_uri} already holds data staged from another source or with other "
                f"split settings (staged from {existing.get('source', '?')!r}, fingerprint "
                f"{str(existing.get('source_fingerprint'))[:12]}; this source "
                f"{source!r} has {report.fingerprint[:12]}). Use another experiment name, "
                f"or delete {data_uri}/ to stage again")
        leftovers = storage.list(data_uri)
        if leftovers:
            log.warning("removing %d objects of an unfinished stage under %s", len(leftovers),
                        data_uri)
            for uri in leftovers:
                storage.delete(uri)

        _check_all(items)
        usable = _deduplicate(items, report)
        _quarantine(items, storage, data_uri, report)
        if not usable:
            raise DataError(f"{source}: no usable images ({report.files} files, "
                            f"{len(report.quarantined)} quarantined; see "
                            f"{join(data_uri, artifacts.STAGE_REPORT)})")
        splits = _assign(usable, exp, report)
        _assign_folds(usable, splits, exp, report)
        files = write_shards(usable, splits, exp, storage, data_uri, scratch)
        report.usable = len(usable)
        report.seconds = time.monotonic() - started
        storage.write_json(join(data_uri, artifacts.STAGE_REPORT), report.to_dict())
        manifest = build_manifest(usable, splits, files, exp, report)
        storage.write_json(manifest_uri, manifest)
    log.info("%s", report.summary())
    return report


def _check_all(items: list[_Item]) -> None:
    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply stricter limits
    tf_decode = tf_decoder()
    done = 0
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
        for _ in pool.map(lambda it: _check(it, tf_decode), items):
            done += 1
            if done % 500 == 0 or done == len(items):
                log.info("checked %d/%d files (%.1f s)", done, len(items), time.monotonic() - t0)


def _deduplicate(items: list[_Item], report: StageReport) -> list[_Item]:
    """Drop exact copies; quarantine bytes that carry both labels. Returns the usable items."""
    by_sha: dict[str, list[_Item]] = {}
    for item in items:
        if not item.reason:
            by_sha.setdefault(item.sha256, []).append(item)
    usable = []
    for copies in by_sha.values():
        if len({c.label for c in copies}) > 1:
            where = ", ".join(f"{CLASSES[c.label]} ({c.rel})" for c in copies)
            for c in copies:
                c.reason = f"conflicting labels: the same image is labelled {where}"
            continue
        # keep the test copy if there is one (the test set is fixed), else the first path
        copies.sort(key=lambda c: (c.origin != "test", c.rel))
        keep = copies[0]
        usable.append(keep)
        for c in copies[1:]:
            report.duplicates.append({"source": c.rel, "duplicate_of": keep.rel,
                                      "sha256": c.sha256})
    usable.sort(key=lambda it: it.rel)
    report.converted = [{"source": it.rel, "reason": it.converted}
                        for it in usable if it.converted]
    return usable


def _quarantine(items: list[_Item], storage: Storage, data_uri: str,
                report: StageReport) -> None:
    for item in items:
        if not item.reason:
            continue
        target = join(data_uri, artifacts.QUARANTINE, item.rel)
        try:
            storage.upload_file(item.path, target)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            target = ""  # unreadable: nothing to copy
        report.quarantined.append({"source": item.rel, "reason": item.reason,
                                   "copy": target})
        log.warning("quarantined %s: %s", item.rel, item.reason)


def _assign(usable: list[_Item], exp: Experiment, report: StageReport) -> list[str]:
    """Group near-duplicates, hold out near-copies of test images, split the groups."""
    d = exp.data
    for c, name in enumerate(CLASSES):
        if not any(it.label == c and it.origin == "source" for it in usable):
            raise DataError(f"{report.source}: no usable {name} images; both classes are needed")
    thumbs = np.stack([it.thumb for it in usable]).astype(np.float32)
    group, stats = near_duplicate_groups(
        thumbs, [it.label for it in usable], [it.number for it in usable],
        [it.rel.rsplit("/", 1)[0] for it in usable], d.near_duplicate_correlation, d.seed)
    report.near_duplicates = stats
    n_groups = stats["groups"]
    has_test = [False] * n_groups
    for it, g in zip(usable, group):
        if it.origin == "test":
            has_test[g] = True
    splits = [""] * len(usable)
    for k, (it, g) in enumerate(zip(usable, group)):
        if it.origin == "test":
            splits[k] = "test"
        elif has_test[g]:
            splits[k] = "held_out"
            report.held_out.append({"source": it.rel, "reason": "near-duplicate of a test image"})
    fractions = {"validation": d.validation_fraction, "test": d.test_fraction}
    fractions["train"] = 1.0 - sum(fractions.values())
    source = [k for k, (it, g) in enumerate(zip(usable, group))
              if it.origin == "source" and not has_test[g]]
    chosen = split_images([group[k] for k in source], [usable[k].label for k in source],
                          fractions, d.seed)
    for k, split in zip(source, chosen):
        splits[k] = split
    for it, g in zip(usable, group):
        it.group = g
    report.splits = {}
    for s in SPLITS:
        labels = [it.label for it, sp in zip(usable, splits) if sp == s]
        report.splits[s] = {"count": len(labels),
                            **{name: labels.count(c) for c, name in enumerate(CLASSES)}}
    needed = ["train", "validation"] + (["test"] if d.test_fraction or d.test_source else [])
    for s in needed:
        for name in CLASSES:
            if report.splits[s][name] == 0:
                raise DataError(
                    f"{report.source}: too few {name} images to fill every split: {s} got "
                    f"none ({report.splits}); add images or lower the split fractions")
    return splits


def _assign_folds(usable: list[_Item], splits: list[str], exp: Experiment,
                  report: StageReport) -> None:
    """Fold 0: the validation split; folds 1..F-1: the train split's groups, stratified.

    F = 1 + round(train fraction / validation fraction), at most ``MAX_FOLDS``, so a fold
    is about as large as the validation split; fewer when a fold would miss a class, and
    none (train images -1, ``report.folds`` one entry) when fewer than two parts remain.
    """
    d = exp.data
    for it, sp in zip(usable, splits):
        it.fold = 0 if sp == "validation" else -1
    train_fraction = 1.0 - d.validation_fraction - d.test_fraction
    parts = min(MAX_FOLDS - 1, round(train_fraction / d.validation_fraction))
    groups = sorted({it.group for it, sp in zip(usable, splits) if sp == "train"})
    index = {g: k for k, g in enumerate(groups)}
    group_labels = [[0] * len(CLASSES) for _ in groups]
    for it, sp in zip(usable, splits):
        if sp == "train":
            group_labels[index[it.group]][it.label] += 1
    chosen: list[int] = []
    while parts >= 2:
        chosen = fold_groups(group_labels, parts, d.seed)
        filled = np.zeros((parts, len(CLASSES)))
        for g, f in enumerate(chosen):
            filled[f] += group_labels[g]
        if (filled > 0).all():
            break
        parts -= 1
    if parts >= 2:
        for it, sp in zip(usable, splits):
            if sp == "train":
                it.fold = 1 + chosen[index[it.group]]
    else:
        log.info("too few training images for validation folds (confirmation trials will vary "
                 "the seed only)")
    report.folds = []
    for f in range(1 + parts if parts >= 2 else 1):
        labels = [it.label for it in usable if it.fold == f]
        report.folds.append({"count": len(labels),
                             **{name: labels.count(c) for c, name in enumerate(CLASSES)}})
