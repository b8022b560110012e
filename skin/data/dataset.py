"""The input side of training and serving: staged shards -> local disk -> tf.data.

    local = sync_data(storage, exp.data_uri, runtime.work_dir / "data")   # once per worker
    train = dataset(local, "train", exp.data.image_size, 32, training=True, seed=exp.data.seed)
    val = dataset(local, "validation", exp.data.image_size, 32, training=False)
    train2 = dataset(local, "train", exp.data.image_size, 32, training=True, fold=2)  # folds

``fold=f`` (1..F-1, F = :func:`folds`) moves validation to fold ``f`` of the training part
(skin.staging.stage): "validation" is the images of fold ``f``, "train" the rest of train and
validation; with ``fold=None`` or 0 the splits are the staged ones.

Images come out as float32 0..255, ``[image_size, image_size, 3]``, labels as
float32 0/1 (1 = malignant). Augmentation and rescaling are Keras layers in
the model (skin/model/hypermodel.py), not here, so a served image goes through exactly
the same steps: :func:`load_images` runs stage's conversion
(:func:`skin.data.images.prepare_image`) and this module's decode-and-resize.

Resizing squashes the whole image to a square (no crop: a lesion's border
matters), with antialiasing, then rounds to 8 bit so the in-memory cache is
small; training and serving round the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from skin.data.images import CLASSES
from skin.errors import DataError, RetryableError
from skin.infra.artifacts import MANIFEST
from skin.infra.documents import DataManifest, read_manifest
from skin.infra.storage import Storage, join

log = logging.getLogger(__name__)

_SHUFFLE_BUFFER_MAX = 10_000


# ---------------------------------------------------------------------------
# Manifest and sync

def load_manifest(local_dir: str | os.PathLike) -> dict:
    """The synced manifest; :class:`DataError` when the folder holds no finished sync."""
    path = Path(local_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no staged data here (run sync_data first)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest without its own ``manifest_sha256`` key (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def _verify_manifest(manifest: dict, where: str) -> None:
    DataManifest.from_json(manifest, where)  # DocumentError (a DataError) for another shape
    digest = manifest.get("manifest_sha256")
    if digest and digest != manifest_digest(manifest):
        raise DataError(f"{where}: manifest_sha256 does not match its content (corrupt)")


def _shard_files(manifest: dict) -> dict[str, dict]:
    """Shard name -> {"bytes", "sha256"} (either may be None for manifests without sizes)."""
    files = dict(manifest.get("files") or {})
    for split in manifest["splits"].values():
        for name in split.get("shards", []):
            files.setdefault(name, {"bytes": None, "sha256": None})
    for name in files:
        if "/" in name or "\\" in name or name.startswith("."):
            raise DataError(f"manifest names an unsafe shard file {name!r}")
    return files


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wait_for_manifest(storage: Storage, data_uri: str, timeout_s: float,
                      poll_s: float = 15.0, *, setting: str | None = None) -> dict:
    """Wait until ``data_uri/manifest.json`` exists (stage writes it last); returns it.

    Polls with a jittered backoff from 1 s up to ``poll_s``, says once that it waits, and
    raises :class:`RetryableError` after ``timeout_s`` (the stage may still come), naming
    ``setting`` (what bounds the wait) when given.
    """
    uri = join(data_uri, MANIFEST)
    deadline = time.monotonic() + timeout_s
    delay, said = 1.0, False
    while not storage.exists(uri):
        left = deadline - time.monotonic()
        if left <= 0:
            bound = f" ({setting})" if setting else ""
            raise RetryableError(f"no staged data at {data_uri} after waiting {timeout_s:.0f} s"
                                 f"{bound}; is the stage job done?")
        if not said:
            log.info("waiting for staged data at %s (up to %.0f s; the stage job writes "
                     "%s last)", data_uri, timeout_s, MANIFEST)
            said = True
        time.sleep(min(delay * (1 + 0.2 * random.random()), poll_s, left))
        delay = min(delay * 2, poll_s)
    return json.loads(storage.read_bytes(uri))


def sync_data(storage: Storage, data_uri: str, local_dir: str | os.PathLike, *,
              on_synced: Callable[[int, float], None] | None = None) -> Path:
    """Copy the staged manifest and shards to ``local_dir`` once; returns ``local_dir``.

    When ``local_dir`` already holds the same manifest and every shard has
    its recorded size, nothing is downloaded. Otherwise the missing or
    different shards are downloaded and checked against the manifest's sizes
    and sha256; the local manifest is written last, so its presence means a
    complete copy. ``on_synced(bytes_downloaded, seconds)`` is called after a
    sync (metrics). A missing remote manifest is a :class:`FileNotFoundError`
    (the stage has not finished); a shard that does not match its manifest
    entry is a :class:`DataError`.
    """
    started = time.monotonic()
    local = Path(local_dir)
    remote_bytes = storage.read_bytes(join(data_uri, MANIFEST))
    try:
        remote = json.loads(remote_bytes)
    except json.JSONDecodeError as e:
        raise DataError(f"{join(data_uri, MANIFEST)}: not valid JSON ({e})") from None
    _verify_manifest(remote, join(data_uri, MANIFEST))
    files = _shard_files(remote)

    local_manifest = local / MANIFEST
    if local_manifest.is_file() and local_manifest.read_bytes() == remote_bytes and all(
            (local / name).is_file()
            and (f.get("bytes") is None or (local / name).stat().st_size == f["bytes"])
            for name, f in files.items()):
        log.info("data already synced in %s (%d shards)", local, len(files))
        return local

    local.mkdir(parents=True, exist_ok=True)
    if local_manifest.exists():
        local_manifest.unlink()  # the copy is incomplete until the manifest is back
    downloaded = 0
    for name, f in sorted(files.items()):
        path = local / name
        if path.is_file() and f.get("bytes") is not None and path.stat().st_size == f["bytes"] \
                and (f.get("sha256") is None or _sha256_file(path) == f["sha256"]):
            continue
        downloaded += storage.download_file(join(data_uri, name), path)
        size = path.stat().st_size
        if f.get("bytes") is not None and size != f["bytes"]:
            raise DataError(f"{join(data_uri, name)}: {size} bytes, the manifest says "
                            f"{f['bytes']}; stage the data again")
        if f.get("sha256") and _sha256_file(path) != f["sha256"]:
            raise DataError(f"{join(data_uri, name)}: sha256 does not match the manifest; "
                            "stage the data again")
    for stale in local.glob("*.tfrecord"):
        if stale.name not in files:
            stale.unlink()
    tmp = local / (MANIFEST + ".tmp")
    tmp.write_bytes(remote_bytes)
    os.replace(tmp, local_manifest)
    seconds = time.monotonic() - started
    log.info("synced %d shards (%.1f MB downloaded) from %s to %s in %.1f s", len(files),
             downloaded / 1e6, data_uri, local, seconds)
    if on_synced is not None:
        on_synced(downloaded, seconds)
    return local


def _split(manifest: dict, split: str) -> dict:
    try:
        return manifest["splits"][split]
    except KeyError:
        raise DataError(f"no split {split!r} in the manifest; expected one of "
                        f"{', '.join(manifest.get('splits', {}))}") from None


def folds(manifest: dict) -> int:
    """Validation folds of the staged training part: 1 (only the validation split) when the
    data were staged without folds, or too few to make them."""
    return DataManifest(manifest).folds


def staged_folds(storage: Storage, data_uri: str) -> int:
    """:func:`folds` of the manifest in the bucket (the chief's view); 1 when none is staged."""
    try:
        return read_manifest(storage, data_uri).folds
    except FileNotFoundError:
        return 1


def _counts(manifest: dict, split: str, fold: int | None) -> dict[str, int]:
    """``{"count", "benign", "malignant"}`` of ``split`` with validation on ``fold``."""
    s = _split(manifest, split)
    if not fold:
        return {"count": int(s["count"]), **{c: int(s.get(c, 0)) for c in CLASSES}}
    if split not in ("train", "validation"):
        raise DataError(f"split {split!r} has no folds; only train and validation do")
    n = folds(manifest)
    if not 0 < fold < n:
        raise DataError(f"fold {fold} is not staged: the data have {n} fold(s) "
                        f"(valid: 1..{n - 1})" if n > 1 else
                        f"fold {fold} is not staged: the data were staged without validation "
                        "folds (stage again with this version, or too few images)")
    held = manifest["fold_counts"][fold]
    if split == "validation":
        return {"count": int(held["count"]), **{c: int(held[c]) for c in CLASSES}}
    both = [_split(manifest, s) for s in ("train", "validation")]
    return {k: sum(int(b.get(k, 0)) for b in both) - int(held[k])
            for k in ("count", *CLASSES)}


def split_size(local_dir: str | os.PathLike, split: str, fold: int | None = None) -> int:
    """Images in ``split`` (0 when the split is empty), with validation on ``fold``."""
    return _counts(load_manifest(local_dir), split, fold)["count"]


def class_counts(local_dir: str | os.PathLike, split: str,
                 fold: int | None = None) -> dict[str, int]:
    """``{"benign": n, "malignant": m}`` for ``split``, with validation on ``fold``."""
    counts = _counts(load_manifest(local_dir), split, fold)
    return {c: counts[c] for c in CLASSES}


# ---------------------------------------------------------------------------
# tf.data

def decode_and_resize(jpeg, image_size: int):
    """JPEG bytes (a scalar string tensor) -> uint8 ``[image_size, image_size, 3]``.

    Bilinear with antialiasing (so downscaling a 1024 px image does not
    alias), rounded to 8 bit. Training and :func:`load_images` both use it.
    """
    import tensorflow as tf

    img = tf.io.decode_jpeg(jpeg, channels=3)
    img = tf.image.resize(img, [image_size, image_size], method="bilinear", antialias=True)
    img = tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)
    img.set_shape([image_size, image_size, 3])
    return img


def dataset(local_dir: str | os.PathLike, split: str, image_size: int, batch_size: int, *,
            training: bool, seed: int = 0, cache: bool = True, fold: int | None = None):
    """Batches of ``(float32 image 0..255 [image_size, image_size, 3], float32 label)``.

    Training: shards in a seeded random order, read in parallel, examples
    reshuffled every epoch. Otherwise: every example once, in shard order.
    With ``cache`` the decoded, resized 8-bit images stay in memory after the
    first pass (a 128 px image is 48 KiB; the whole ISIC set ~130 MB).
    ``fold`` f >= 1: "validation" is fold f of the training part, "train" the
    other images of the train and validation shards (a record's ``fold`` feature).
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    local = Path(local_dir)
    manifest = load_manifest(local)
    count = _counts(manifest, split, fold)["count"]
    names = [n for s in (("train", "validation") if fold else (split,))
             for n in _split(manifest, s).get("shards", [])]
    shards = [str(local / name) for name in names]
    if not shards or not count:
        raise DataError(f"split {split!r} is empty in {local}"
                        + (f" with validation on fold {fold}" if fold else ""))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(f"{local}: shard files missing ({', '.join(missing[:3])}); sync again")
    autotune = tf.data.AUTOTUNE
    features = {"image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64)}
    fold_feature = {"fold": tf.io.FixedLenFeature([], tf.int64, default_value=-1)}

    def in_split(record):  # records staged before folds have none: -1
        f = tf.io.parse_single_example(record, fold_feature)["fold"]
        return tf.equal(f, fold) if split == "validation" else \
            tf.logical_and(tf.not_equal(f, fold), tf.greater_equal(f, 0))

    def parse(record):
        ex = tf.io.parse_single_example(record, features)
        return decode_and_resize(ex["image"], image_size), tf.cast(ex["label"], tf.float32)

    if training:
        files = tf.data.Dataset.from_tensor_slices(shards).shuffle(
            len(shards), seed=seed, reshuffle_each_iteration=True)
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(shards), 4),
                              num_parallel_calls=autotune, deterministic=True)
    else:
        ds = tf.data.TFRecordDataset(shards)
    if fold:
        ds = ds.filter(in_split)
    ds = ds.map(parse, num_parallel_calls=autotune, deterministic=True)
    # a known length lets Keras size its epochs (no "ran out of data" on the first one)
    ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(count, _SHUFFLE_BUFFER_MAX), seed=seed,
                        reshuffle_each_iteration=True)
    # After the cache an epoch costs what an in-memory array feed costs: shuffle and
    # batch the 8-bit images, then one cast per batch instead of one per image.
    ds = ds.batch(batch_size)
    ds = ds.map(lambda img, label: (tf.cast(img, tf.float32), label))
    return ds.prefetch(autotune)


def load_images(paths: Iterable[str | os.PathLike], image_size: int,
                storage: Storage | None = None) -> np.ndarray:
    """Image files (any format and mode PIL reads) -> float32 ``[n, size, size, 3]`` 0..255.

    The same steps as staging plus training: :func:`skin.data.images.prepare_image`
    (RGB JPEG, big images downscaled), then :func:`decode_and_resize`.
    ``gs://`` paths are read through ``storage``. An unusable file is a
    :class:`DataError` naming it and saying why.
    """
    import tensorflow as tf

    from skin.data.images import UnusableImage, prepare_image

    store = storage or Storage()
    out = []
    for path in paths:
        data = store.read_bytes(path)
        try:
            jpeg = prepare_image(data).jpeg
        except UnusableImage as e:
            raise DataError(f"{path}: {e}") from None
        out.append(decode_and_resize(tf.constant(jpeg), image_size).numpy())
    if not out:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return np.stack(out).astype(np.float32)
