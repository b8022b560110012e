"""The input side of training and serving: staged shards -> local disk -> tf.data.

    local = sync_data(storage, exp.data_uri, runtime.work_dir / "data")   # once per worker
    train = dataset(local, "train", exp.data.image_size, 32, training=True, seed=exp.data.seed)
    val = dataset(local, "validation", exp.data.image_size, 32, training=False)

Images come out as float32 0..255, ``[image_size, image_size, 3]``, labels as
float32 0/1 (1 = malignant). Augmentation and rescaling are Keras layers in
the model (skin/model.py), not here, so a served image goes through exactly
the same steps: :func:`load_images` runs stage's conversion
(:func:`skin.stage.prepare_image`) and this module's decode-and-resize.

Resizing squashes the whole image to a square (no crop: a lesion's border
matters), with antialiasing, then rounds to 8 bit so the in-memory cache is
small; training and serving round the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from skin.errors import DataError, RetryableError
from skin.storage import Storage, join

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CLASSES = ("benign", "malignant")
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


def _verify_manifest(manifest: dict, where: str) -> None:
    from skin.stage import manifest_digest

    if not isinstance(manifest, dict) or manifest.get("version") != 1 \
            or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{where}: not a version 1 staging manifest")
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
                      poll_s: float = 5.0) -> dict:
    """Poll until ``data_uri/manifest.json`` exists (stage finished); returns it.

    Raises :class:`RetryableError` after ``timeout_s`` (the stage may still come).
    """
    uri = join(data_uri, MANIFEST)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            raise RetryableError(f"{uri}: no staged data after waiting {timeout_s:.0f} s "
                                 "(has the stage job run?)")
        log.info("waiting for staged data at %s", uri)
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())) or 0.01)


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


def split_size(local_dir: str | os.PathLike, split: str) -> int:
    """Images in ``split`` (0 when the split is empty)."""
    return int(_split(load_manifest(local_dir), split)["count"])


def class_counts(local_dir: str | os.PathLike, split: str) -> dict[str, int]:
    """``{"benign": n, "malignant": m}`` for ``split``."""
    s = _split(load_manifest(local_dir), split)
    return {c: int(s.get(c, 0)) for c in CLASSES}


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
            training: bool, seed: int = 0, cache: bool = True):
    """Batches of ``(float32 image 0..255 [image_size, image_size, 3], float32 label)``.

    Training: shards in a seeded random order, read in parallel, examples
    reshuffled every epoch. Otherwise: every example once, in shard order.
    With ``cache`` the decoded, resized 8-bit images stay in memory after the
    first pass (a 128 px image is 48 KiB; the whole ISIC set ~130 MB).
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    local = Path(local_dir)
    info = _split(load_manifest(local), split)
    shards = [str(local / name) for name in info.get("shards", [])]
    if not shards or not info.get("count"):
        raise DataError(f"split {split!r} is empty in {local}")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(f"{local}: shard files missing ({', '.join(missing[:3])}); sync again")
    autotune = tf.data.AUTOTUNE
    features = {"image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64)}

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
    ds = ds.map(parse, num_parallel_calls=autotune, deterministic=True)
    # a known length lets Keras size its epochs (no "ran out of data" on the first one)
    ds = ds.apply(tf.data.experimental.assert_cardinality(int(info["count"])))
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(int(info["count"]), _SHUFFLE_BUFFER_MAX), seed=seed,
                        reshuffle_each_iteration=True)
    # After the cache an epoch costs what an in-memory array feed costs: shuffle and
    # batch the 8-bit images, then one cast per batch instead of one per image.
    ds = ds.batch(batch_size)
    ds = ds.map(lambda img, label: (tf.cast(img, tf.float32), label))
    return ds.prefetch(autotune)


def load_images(paths: Iterable[str | os.PathLike], image_size: int,
                storage: Storage | None = None) -> np.ndarray:
    """Image files (any format and mode PIL reads) -> float32 ``[n, size, size, 3]`` 0..255.

    The same steps as staging plus training: :func:`skin.stage.prepare_image`
    (RGB JPEG, big images downscaled), then :func:`decode_and_resize`.
    ``gs://`` paths are read through ``storage``. An unusable file is a
    :class:`DataError` naming it and saying why.
    """
    import tensorflow as tf

    from skin.stage import UnusableImage, prepare_image

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
