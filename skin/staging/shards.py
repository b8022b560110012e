"""What stage writes: the TFRecord shards and ``manifest.json``.

A record holds ``image`` (RGB JPEG bytes, :func:`skin.data.images.prepare_image`), ``label``
(0 benign, 1 malignant), ``sha256`` (of the stored bytes) and ``fold`` (-1: test or no
folds); :func:`skin.data.dataset.dataset` reads them. The items are stage's: each has ``rel``,
``path``, ``label``, ``sha256``, ``stored``, ``stored_sha256``, ``group`` and ``fold``.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from skin.data.dataset import manifest_digest
from skin.data.grouping import SPLITS
from skin.data.images import CLASSES
from skin.errors import DataError
from skin.infra import documents
from skin.infra.config import Experiment
from skin.infra.storage import Storage

log = logging.getLogger(__name__)


def write_shards(usable: list, splits: list[str], exp: Experiment, storage: Storage,
                 data_uri: str, scratch: Path) -> dict[str, dict[str, Any]]:
    """Write each split's images into ``<split>-<i>-of-<n>.tfrecord`` shards (a seeded
    order, round robin), upload them to ``data_uri``; ``{shard name: {"split", "bytes",
    "sha256"}}``. Sets each item's ``shard``. An item whose file changed since it was
    hashed is a :class:`DataError`."""
    import tensorflow as tf

    out_dir = scratch / "shards"
    out_dir.mkdir()
    rng = np.random.default_rng(exp.data.seed)
    files: dict[str, dict[str, Any]] = {}
    for s in SPLITS:
        members = [k for k, sp in enumerate(splits) if sp == s]
        if not members:
            continue
        members = [members[k] for k in rng.permutation(len(members))]
        n = min(exp.data.shards, len(members))
        names = [f"{s}-{i}-of-{n}.tfrecord" for i in range(n)]
        writers = [tf.io.TFRecordWriter(str(out_dir / name)) for name in names]
        try:
            for pos, k in enumerate(members):
                item = usable[k]
                data = item.stored if item.stored is not None else item.path.read_bytes()
                if item.stored is None and hashlib.sha256(data).hexdigest() != item.sha256:
                    raise DataError(f"{item.rel}: changed while it was being staged; stage again")
                example = tf.train.Example(features=tf.train.Features(feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[item.label])),
                    "sha256": tf.train.Feature(bytes_list=tf.train.BytesList(
                        value=[item.stored_sha256.encode()])),
                    "fold": tf.train.Feature(int64_list=tf.train.Int64List(value=[item.fold])),
                }))
                writers[pos % n].write(example.SerializeToString())
                item.shard = names[pos % n]
        finally:
            for w in writers:
                w.close()
        for name in names:
            path = out_dir / name
            files[name] = {"split": s, "bytes": path.stat().st_size,
                           "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        log.info("wrote %d %s images in %d shards", len(members), s, n)
    storage.upload_dir(out_dir, data_uri)
    return files


def build_manifest(usable: list, splits: list[str], files: dict[str, dict[str, Any]],
                   exp: Experiment, report) -> dict:
    """``manifest.json``: the splits, folds, shard files and every image, from the items, the
    shards :func:`write_shards` wrote and the stage report; ``manifest_sha256`` over the rest
    (:func:`skin.data.dataset.manifest_digest`)."""
    split_doc = {}
    for s in SPLITS:
        split_doc[s] = dict(report.splits[s],
                            shards=sorted(name for name, f in files.items() if f["split"] == s))
    images = []
    for it, sp in zip(usable, splits):
        entry = {"sha256": it.stored_sha256, "label": CLASSES[it.label], "split": sp,
                 "source": it.rel, "group": it.group, "fold": it.fold}
        if it.stored_sha256 != it.sha256:
            entry["source_sha256"] = it.sha256
        images.append(entry)
    manifest = {
        "version": documents.MANIFEST_VERSION,
        "source_fingerprint": report.fingerprint,
        "source": report.source,
        "test_source": report.test_source,
        "synthetic": report.synthetic,
        "provenance": report.provenance,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "image_size": exp.data.image_size,
        "classes": list(CLASSES),
        "settings": {k: getattr(exp.data, k) for k in (
            "validation_fraction", "test_fraction", "seed", "shards",
            "near_duplicate_correlation")},
        "splits": split_doc,
        "folds": len(report.folds),  # skin.data.dataset.dataset(fold=f), f in 1..folds-1
        "fold_counts": report.folds,
        "files": {name: {"bytes": f["bytes"], "sha256": f["sha256"]}
                  for name, f in sorted(files.items())},
        "images": images,
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return manifest
