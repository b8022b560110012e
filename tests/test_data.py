"""skin.data.dataset: sync the staged shards once, the tf.data pipeline, and train/serve parity."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skin.data import synthetic
from skin.data.dataset import (
    class_counts,
    dataset,
    decode_and_resize,
    folds,
    load_images,
    load_manifest,
    split_size,
    staged_folds,
    sync_data,
    wait_for_manifest,
)
from skin.errors import DataError, RetryableError
from skin.infra.config import API_VERSION, KIND, parse_experiment
from skin.infra.storage import Storage, join
from skin.staging.stage import stage

IMAGE_SIZE = 48


@pytest.fixture(scope="module")
def staged(real_or_synthetic_images, emulator, tmp_path_factory) -> dict:
    """The small folder plus a PNG with alpha (converted at stage), staged once."""
    src = tmp_path_factory.mktemp("data-src") / "source"
    shutil.copytree(real_or_synthetic_images, src, symlinks=True)
    extra = synthetic.generate(tmp_path_factory.mktemp("extra"), 2, size=200, seed=5)
    rgba = Image.open(extra / "malignant/0.jpg").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(src / "malignant" / "alpha.png")
    bucket = f"t-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    exp = parse_experiment({
        "apiVersion": API_VERSION, "kind": KIND, "name": "data-test",
        "storage": {"bucket": bucket, "prefix": ""},
        "data": {"source": str(src), "validation_fraction": 0.25, "test_fraction": 0.0,
                 "shards": 3, "seed": 3}}, env={})
    storage = Storage()
    report = stage(exp, storage, work_dir=tmp_path_factory.mktemp("work"))
    return {"exp": exp, "storage": storage, "report": report, "src": src}


@pytest.fixture(scope="module")
def local(staged, tmp_path_factory) -> Path:
    return sync_data(staged["storage"], staged["exp"].data_uri,
                     tmp_path_factory.mktemp("synced") / "data")


def test_sync_downloads_once(staged, tmp_path):
    calls = []
    target = tmp_path / "data"
    out = sync_data(staged["storage"], staged["exp"].data_uri, target,
                    on_synced=lambda n, s: calls.append(n))
    assert out == target
    shards = sorted(target.glob("*.tfrecord"))
    manifest = load_manifest(target)
    assert [p.name for p in shards] == sorted(manifest["files"])
    assert calls == [sum(f["bytes"] for f in manifest["files"].values())]
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    sync_data(staged["storage"], staged["exp"].data_uri, target,
              on_synced=lambda n, s: calls.append(n))
    assert len(calls) == 1  # nothing downloaded the second time
    assert {p: p.stat().st_mtime_ns for p in shards} == mtimes


def test_sync_repairs_a_damaged_copy(staged, tmp_path):
    target = sync_data(staged["storage"], staged["exp"].data_uri, tmp_path / "data")
    manifest = load_manifest(target)
    victim = sorted(manifest["files"])[0]
    with open(target / victim, "r+b") as f:
        f.truncate(10)
    (target / "stale-0-of-1.tfrecord").write_bytes(b"old")
    calls = []
    sync_data(staged["storage"], staged["exp"].data_uri, target,
              on_synced=lambda n, s: calls.append(n))
    assert calls == [manifest["files"][victim]["bytes"]]  # only the damaged shard again
    assert (target / victim).stat().st_size == manifest["files"][victim]["bytes"]
    assert not (target / "stale-0-of-1.tfrecord").exists()


def test_sync_before_stage_is_file_not_found(storage, bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        sync_data(storage, f"gs://{bucket}/x/data", tmp_path / "d")
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_a_tampered_manifest_is_refused(staged, storage, bucket, tmp_path):
    manifest = staged["storage"].read_json(join(staged["exp"].data_uri, "manifest.json"))
    manifest["splits"]["train"]["count"] += 1
    storage.write_json(f"gs://{bucket}/t/data/manifest.json", manifest)
    with pytest.raises(DataError, match="manifest_sha256 does not match"):
        sync_data(storage, f"gs://{bucket}/t/data", tmp_path / "d")


def test_wait_for_manifest(staged, storage, bucket):
    assert wait_for_manifest(storage, staged["exp"].data_uri, timeout_s=1)["version"] == 1
    with pytest.raises(RetryableError, match="no staged data at .* after waiting"):
        wait_for_manifest(storage, f"gs://{bucket}/none/data", timeout_s=0.2, poll_s=0.05)


def test_split_size_and_class_counts(staged, local):
    for split in ("train", "validation"):
        counts = class_counts(local, split)
        assert counts == {c: staged["report"].splits[split][c] for c in ("benign", "malignant")}
        assert split_size(local, split) == sum(counts.values()) > 0
    assert split_size(local, "test") == 0
    with pytest.raises(DataError, match="no split 'dev'"):
        split_size(local, "dev")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_evaluation_dataset_yields_every_image_once(local, split):
    batches = list(dataset(local, split, IMAGE_SIZE, 8, training=False))
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert images.dtype == np.float32 and labels.dtype == np.float32
    assert images.shape == (split_size(local, split), IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batches[0][0].shape[0] == 8
    assert 0.0 <= images.min() and images.max() <= 255.0 and images.std() > 5
    assert np.array_equal(images, np.round(images))  # 8-bit values, as load_images gives
    counts = class_counts(local, split)
    assert int(labels.sum()) == counts["malignant"]
    assert int((labels == 0).sum()) == counts["benign"]
    again = np.concatenate([b[1].numpy() for b in dataset(local, split, IMAGE_SIZE, 8,
                                                           training=False)])
    assert np.array_equal(labels, again)  # evaluation order is stable


def test_training_dataset_reshuffles_every_epoch(local):
    ds = dataset(local, "train", IMAGE_SIZE, 16, training=True, seed=1)
    epochs = []
    for _ in range(2):
        epochs.append(np.concatenate([b[0].numpy().reshape(len(b[0]), -1).sum(axis=1)
                                      for b in ds]))
    assert len(epochs[0]) == len(epochs[1]) == split_size(local, "train")
    assert not np.array_equal(epochs[0], epochs[1])  # a new order...
    assert np.allclose(np.sort(epochs[0]), np.sort(epochs[1]))  # ...of the same images
    spec = ds.element_spec
    assert spec[0].shape.as_list() == [None, IMAGE_SIZE, IMAGE_SIZE, 3]
    assert spec[1].shape.as_list() == [None]


def test_training_order_follows_the_seed(local):
    def first_epoch(seed):
        ds = dataset(local, "train", IMAGE_SIZE, 64, training=True, seed=seed, cache=False)
        return np.concatenate([b[1].numpy() for b in ds])
    assert np.array_equal(first_epoch(4), first_epoch(4))


def test_empty_split_and_missing_sync_are_data_errors(local, tmp_path):
    with pytest.raises(DataError, match="split 'test' is empty"):
        dataset(local, "test", IMAGE_SIZE, 4, training=False)
    with pytest.raises(DataError, match="no staged data here"):
        dataset(tmp_path, "train", IMAGE_SIZE, 4, training=True)


def _image_keys(ds) -> list[str]:
    import hashlib

    return [hashlib.sha256(img.tobytes()).hexdigest() for b in ds for img in b[0].numpy()]


def test_fold_datasets_hold_the_manifests_counts_and_never_overlap(staged, local):
    manifest = load_manifest(local)
    # train 0.75 / validation 0.25 -> the validation split and 3 parts of the train split
    assert folds(manifest) == 4 == staged_folds(staged["storage"], staged["exp"].data_uri)
    staged_part = set(_image_keys(dataset(local, "train", IMAGE_SIZE, 16, training=False))) | \
        set(_image_keys(dataset(local, "validation", IMAGE_SIZE, 16, training=False)))
    held_out = []
    for f in (1, 2, 3):
        val_ds = dataset(local, "validation", IMAGE_SIZE, 16, training=False, fold=f)
        train_ds = dataset(local, "train", IMAGE_SIZE, 16, training=True, seed=2, fold=f)
        val, train = _image_keys(val_ds), _image_keys(train_ds)
        assert int(val_ds.cardinality()) == -(-len(val) // 16)  # known: Keras sizes epochs
        assert len(val) == split_size(local, "validation", f) == \
            manifest["fold_counts"][f]["count"] > 0
        assert len(train) == split_size(local, "train", f) == len(staged_part) - len(val)
        assert not set(val) & set(train) and set(val) | set(train) == staged_part
        labels = np.concatenate([b[1].numpy() for b in val_ds])
        assert int(labels.sum()) == class_counts(local, "validation", f)["malignant"] > 0
        labels = np.concatenate([b[1].numpy() for b in train_ds])
        assert int(labels.sum()) == class_counts(local, "train", f)["malignant"] > 0
        held_out += val
    assert len(held_out) == len(set(held_out))  # each image validates on one fold at most
    assert class_counts(local, "validation", 0) == class_counts(local, "validation")


def test_folds_that_are_not_staged_are_data_errors(local, tmp_path):
    with pytest.raises(DataError, match=r"fold 4 is not staged: the data have 4 fold\(s\)"):
        dataset(local, "validation", IMAGE_SIZE, 4, training=False, fold=4)
    with pytest.raises(DataError, match="split 'test' has no folds"):
        split_size(local, "test", 1)
    older = tmp_path / "older"  # staged before folds: the same shards, no folds in the manifest
    shutil.copytree(local, older)
    manifest = load_manifest(older)
    for key in ("folds", "fold_counts"):
        del manifest[key]
    (older / "manifest.json").write_text(__import__("json").dumps(manifest))
    assert folds(manifest) == 1
    assert len(_image_keys(dataset(older, "validation", IMAGE_SIZE, 8, training=False))) == \
        split_size(older, "validation")
    with pytest.raises(DataError, match="staged without validation folds"):
        dataset(older, "train", IMAGE_SIZE, 4, training=True, fold=1)


def _stored_images(local: Path) -> dict[str, bytes]:
    import tensorflow as tf

    out = {}
    for shard in sorted(local.glob("*.tfrecord")):
        for rec in tf.data.TFRecordDataset(str(shard)):
            f = tf.train.Example.FromString(rec.numpy()).features.feature
            out[f["sha256"].bytes_list.value[0].decode()] = f["image"].bytes_list.value[0]
    return out


@pytest.mark.parametrize("kind", ["jpeg", "png-with-alpha"])
def test_load_images_matches_what_training_sees(staged, local, kind):
    manifest = load_manifest(local)
    stored = _stored_images(local)
    if kind == "jpeg":
        entry = next(i for i in manifest["images"] if i["source"].endswith(".jpg"))
    else:
        entry = next(i for i in manifest["images"] if i["source"] == "malignant/alpha.png")
    served = load_images([staged["src"] / entry["source"]], IMAGE_SIZE)
    trained = decode_and_resize(stored[entry["sha256"]], IMAGE_SIZE).numpy().astype(np.float32)
    assert served.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and served.dtype == np.float32
    assert np.array_equal(served[0], trained)


def test_load_images_any_mode_and_errors(tmp_path, storage, bucket):
    Image.new("L", (300, 200), 90).save(tmp_path / "gray.png")
    Image.new("CMYK", (64, 64), (0, 50, 90, 10)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (10, 200, 30, 0)).save(tmp_path / "clear.png")
    storage.upload_file(tmp_path / "gray.png", f"gs://{bucket}/in/gray.png")
    arr = load_images([tmp_path / "gray.png", str(tmp_path / "cmyk.jpg"),
                       tmp_path / "clear.png", f"gs://{bucket}/in/gray.png"], 32, storage)
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.float32
    assert np.allclose(arr[0], 90, atol=1)  # gray stays gray in all three channels
    assert np.allclose(arr[2], 255, atol=1)  # fully transparent -> white
    assert np.array_equal(arr[0], arr[3])
    assert load_images([], 32).shape == (0, 32, 32, 3)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match="bad.jpg"):
        load_images([tmp_path / "bad.jpg"], 32)
    with pytest.raises(FileNotFoundError):
        load_images([tmp_path / "missing.jpg"], 32)

