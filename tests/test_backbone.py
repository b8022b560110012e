"""skin.model.backbone: a keras.applications network in place of the searched body, its weights
from a bucket, a local file or Keras; the search space, the retrain and the chief with it."""

from __future__ import annotations

import dataclasses
import json
import uuid

import h5py
import keras
import keras_tuner
import numpy as np
import pytest

from skin.context import RoleContext
from skin.errors import ConfigError
from skin.infra.config import API_VERSION, KIND, parse_experiment
from skin.infra.runtime import Runtime
from skin.infra.storage import join
from skin.model import backbone as B
from skin.model import hypermodel as M
from skin.publishing import retrain as rt

SIZE = 32


def experiment(bucket: str = "skin-test", source: str = "synthetic", **backbone):
    return parse_experiment({
        "apiVersion": API_VERSION, "kind": KIND, "name": "bb",
        "storage": {"bucket": bucket, "prefix": "it"},
        "data": {"source": str(source), "validation_fraction": 0.3, "test_fraction": 0.2,
                 "image_size": SIZE, "seed": 3, "shards": 1},
        "search": {"tuner": "random", "max_trials": 2, "max_epochs": 2},
        "retrain": {"epochs": 2, "patience": 0, "target_sensitivity": 0.9, "restore_best": False},
        "backbone": backbone,
    }, env={})


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def nested(model: keras.Model) -> keras.Model:
    """The backbone inside a built model (its only nested Model)."""
    (net,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return net


def same_weights(a: keras.Model, b: keras.Model) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))


def save_legacy_h5(net: keras.Model, path) -> None:
    """The HDF5 layout of Keras's own ImageNet files (what a user uploads to a bucket)."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, net)


@pytest.fixture(autouse=True)
def _fresh_fetch_cache():
    B.clear_cache()
    yield
    B.clear_cache()


@pytest.fixture(scope="module")
def donor():
    """A MobileNetV2 with weights that differ from any fresh initialisation: the
    'pretrained' weights of these tests."""
    keras.utils.set_random_seed(123)
    net = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=False,
                                         weights=None)
    net.set_weights([w + np.float32(0.01) for w in net.get_weights()])
    return net


# ---------------------------------------------------------------------------
# Configuration


def test_the_default_is_no_backbone_and_the_searched_cnn():
    exp = experiment()
    assert (exp.backbone.name, exp.backbone.weights, exp.backbone.trainable) == ("none", "", True)
    hp = keras_tuner.HyperParameters()
    M.SkinHyperModel(exp).build(hp)
    assert set(B.BODY_HYPERPARAMETERS) <= set(hp.values)


@pytest.mark.parametrize("backbone, message", [
    ({"name": "resnet9000"}, "backbone.name: 'resnet9000' is not valid; expected one of 'none'"),
    ({"weights": "imagenet"}, "backbone.weights: 'imagenet' is not valid with backbone.name 'none'"),
    ({"name": "mobilenetv2", "trainable": False}, "backbone.trainable: false is not valid without "
                                                  "backbone.weights"),
    ({"name": "mobilenetv2", "weights": "s3://b/w.h5"}, "backbone.weights: 's3://b/w.h5' is not "
                                                        "valid; expected '', 'imagenet', a gs://"),
    ({"name": "mobilenetv2", "trainable": "yes"}, "backbone.trainable: 'yes' is not valid"),
    ({"name": "efficientnet_lite0", "weights": "imagenet"},
     "backbone.weights: 'imagenet' is not valid with backbone.name 'efficientnet_lite0'"),
])
def test_bad_backbone_settings_name_the_key(backbone, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        experiment(**backbone)


def test_the_config_lists_the_same_backbones_as_the_module():
    from skin.infra import config

    assert config._BACKBONES == B.NAMES


def test_a_saved_search_with_another_backbone_is_another_search():
    from skin.tuning.fingerprint import search_fingerprint

    plain = search_fingerprint(experiment())
    scratch = search_fingerprint(experiment(name="mobilenetv2"))
    pretrained = search_fingerprint(experiment(name="mobilenetv2", weights="gs://b/w.h5"))
    frozen = search_fingerprint(experiment(name="mobilenetv2", weights="gs://b/w.h5",
                                           trainable=False))
    assert len({plain, scratch, pretrained, frozen}) == 4
    # Without a backbone the fingerprint is what it was before backbones existed, so a
    # search saved by an older version still resumes.
    assert plain == search_fingerprint(experiment(name="none"))


def test_environment_overrides_the_backbone():
    doc = experiment().to_dict()
    exp = parse_experiment(doc, env={"SKIN_BACKBONE": "efficientnetb0",
                                     "SKIN_BACKBONE_WEIGHTS": "gs://w/effnet.h5"})
    assert (exp.backbone.name, exp.backbone.weights) == ("efficientnetb0", "gs://w/effnet.h5")


# ---------------------------------------------------------------------------
# The model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnetb0", "efficientnet_lite0"])
def test_a_random_backbone_replaces_the_body_trains_and_round_trips(name, tmp_path):
    hm = M.SkinHyperModel(experiment(name=name))
    hp = keras_tuner.HyperParameters()
    model = hm.build(hp)
    # The body's hyperparameters are not searched; the head's and training's are.
    assert set(hp.values).isdisjoint(B.BODY_HYPERPARAMETERS)
    assert {"pooling", "dense_units", "dropout", "learning_rate", "augment"} <= set(hp.values)
    assert hp.values["learning_rate"] == 3e-3  # from scratch: the from-scratch rates
    net = nested(model)
    assert net.trainable and len(net.trainable_weights) > 0
    # Batch norm that settles within a short training (MobileNetV2 comes with 0.999).
    norms = [la for la in net.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert norms and all(la.momentum == B.RANDOM_INIT_BN_MOMENTUM for la in norms)
    assert all(la.trainable for la in norms)
    x, y = images(8), np.array([0, 1] * 4, "float32")
    before = [w.copy() for w in net.get_weights()]
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert not all(np.array_equal(a, b) for a, b in zip(before, net.get_weights()))
    p = model.predict(x, verbose=0)
    assert p.shape == (8, 1) and np.all((p >= 0) & (p <= 1))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), p, atol=1e-6)
    assert all(la.momentum == B.RANDOM_INIT_BN_MOMENTUM for la in nested(loaded).layers
               if isinstance(la, keras.layers.BatchNormalization))


@pytest.mark.slow
def test_a_random_backbone_still_tells_images_apart_in_inference_mode():
    """Batch norm's moving statistics must forget their start (variance 1) within a short
    training; otherwise inference-mode outputs shrink layer by layer until every image gets
    the same score (what MobileNetV2's own momentum, 0.999, did here)."""
    keras.utils.set_random_seed(5)
    hp = keras_tuner.HyperParameters()
    hp.values.update(augment=0.0, dropout=0.0)
    model = M.SkinHyperModel(experiment(name="mobilenetv2")).build(hp)
    rng = np.random.default_rng(5)
    y = np.array([0, 1] * 32, "float32")
    x = images(64, seed=5) * 0.3 + (y * 80.0)[:, None, None, None]  # brighter = malignant
    model.fit(x, y, epochs=6, batch_size=8, verbose=0)  # 48 steps
    order = rng.permutation(64)
    p = model.predict(x[order], verbose=0)[:, 0]
    from skin.serving.scoring import roc_auc

    # With 0.9 they are told apart; with 0.999 (MobileNetV2's own) or 0.99 every image got
    # the same score here (standard deviation 6e-8 and 3e-8).
    assert p.std() > 1e-4 and roc_auc(y[order], p) > 0.9, (p.std(), roc_auc(y[order], p))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras3", "legacy-h5"])
def test_weights_from_a_bucket_load_into_the_backbone_and_stay_frozen(
        fmt, donor, emulator, storage, bucket, tmp_path):
    local = tmp_path / ("donor.weights.h5" if fmt == "keras3" else "donor_no_top.h5")
    donor.save_weights(local) if fmt == "keras3" else save_legacy_h5(donor, local)
    uri = f"gs://{bucket}/weights/{local.name}"
    storage.upload_file(local, uri)

    exp = experiment(bucket, name="mobilenetv2", weights=uri, trainable=False)
    hm = M.SkinHyperModel(exp, storage=storage, cache_dir=tmp_path / "cache")
    hp = keras_tuner.HyperParameters()
    model = hm.build(hp)
    net = nested(model)
    assert same_weights(net, donor)
    assert hp.values["learning_rate"] == 1e-4  # pretrained: the fine-tuning rates
    assert hm.backbone().weights.startswith(str(tmp_path / "cache"))
    # Frozen: the head learns, the backbone (batch-norm statistics included) does not.
    head = model.get_layer("malignant").get_weights()[0].copy()
    model.fit(images(8), np.array([0, 1] * 4, "float32"), epochs=1, batch_size=4, verbose=0)
    assert same_weights(net, donor)
    assert not np.array_equal(model.get_layer("malignant").get_weights()[0], head)


@pytest.mark.slow
def test_pretrained_and_trainable_fine_tunes_with_frozen_batch_norm_statistics(
        donor, tmp_path):
    local = tmp_path / "donor.weights.h5"
    donor.save_weights(local)
    exp = experiment(name="mobilenetv2", weights=str(local), trainable=True)
    model = M.SkinHyperModel(exp).build(keras_tuner.HyperParameters())
    net = nested(model)
    assert same_weights(net, donor)
    norms = [la for la in net.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert norms and not any(la.trainable for la in norms)
    model.fit(images(8), np.array([0, 1] * 4, "float32"), epochs=1, batch_size=4, verbose=0)
    moved = [w.path for w, start in zip(net.weights, donor.get_weights())
             if not np.array_equal(w.numpy(), start)]
    assert any(p.endswith("kernel") for p in moved)  # fine-tuned
    assert not any("moving_" in p for p in moved)  # inference-mode batch norm


@pytest.mark.slow
def test_keras_imagenet_file_for_efficientnet_goes_through_keras_cache(
        emulator, storage, bucket, tmp_path, monkeypatch):
    """Keras builds EfficientNet with one more rescaling for its ImageNet file than for
    other files: a file with that file's MD5 is handed to Keras as weights='imagenet'.
    Keras's real file cannot be downloaded here, so the test's own file stands in for it
    (its MD5 in our table and in Keras's), and Keras's cache is a temporary folder."""
    import keras.src.applications.efficientnet as keras_efficientnet
    import keras.src.backend.config as keras_config

    net = keras.applications.EfficientNetB0(input_shape=(SIZE, SIZE, 3), include_top=False,
                                            weights=None)
    local = tmp_path / "efficientnetb0_notop.h5"
    save_legacy_h5(net, local)
    digest = B.md5(local)
    monkeypatch.setitem(B.IMAGENET_FILES, "efficientnetb0", ("efficientnetb0_notop.h5", digest))
    monkeypatch.setitem(keras_efficientnet.WEIGHTS_HASHES, "b0", ("unused", digest))
    (tmp_path / "keras-home").mkdir()
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras-home"))
    uri = f"gs://{bucket}/weights/efficientnetb0_notop.h5"
    storage.upload_file(local, uri)

    exp = experiment(bucket, name="efficientnetb0", weights=uri)
    model = M.SkinHyperModel(exp, storage=storage, cache_dir=tmp_path / "c").build(
        keras_tuner.HyperParameters())
    built = nested(model)
    assert (tmp_path / "keras-home" / "models" / "efficientnetb0_notop.h5").is_file()
    assert len(built.layers) == len(net.layers) + 1  # Keras's ImageNet-only rescaling
    assert same_weights(built, net)

    # Any other file is loaded into the network Keras builds for random weights.
    monkeypatch.setitem(B.IMAGENET_FILES, "efficientnetb0", ("efficientnetb0_notop.h5", "0" * 32))
    B.clear_cache()
    other = nested(M.SkinHyperModel(exp, storage=storage, cache_dir=tmp_path / "d").build(
        keras_tuner.HyperParameters()))
    assert len(other.layers) == len(net.layers) and same_weights(other, net)


def test_missing_or_mismatched_weights_are_config_errors_naming_the_file(
        donor, emulator, storage, bucket, tmp_path):
    missing = f"gs://{bucket}/weights/nope.h5"
    hm = M.SkinHyperModel(experiment(bucket, name="mobilenetv2", weights=missing),
                          storage=storage, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"backbone.weights: '{missing}' does not exist"):
        hm.build(keras_tuner.HyperParameters())

    with pytest.raises(ConfigError, match="is not a file on this machine"):
        M.SkinHyperModel(experiment(name="mobilenetv2", weights=str(tmp_path / "absent.h5"))
                         ).build(keras_tuner.HyperParameters())

    # MobileNetV2's weights offered to EfficientNetB0.
    local = tmp_path / "mnv2_no_top.h5"
    save_legacy_h5(donor, local)
    uri = f"gs://{bucket}/weights/mnv2_no_top.h5"
    storage.upload_file(local, uri)
    hm = M.SkinHyperModel(experiment(bucket, name="efficientnetb0", weights=uri),
                          storage=storage, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"backbone.weights: '{uri}' does not fit efficientnetb0"):
        hm.build(keras_tuner.HyperParameters())


def test_the_file_is_downloaded_once_per_process(donor, emulator, storage, bucket, tmp_path):
    local = tmp_path / "w.weights.h5"
    donor.save_weights(local)
    uri = f"gs://{bucket}/weights/w.weights.h5"
    storage.upload_file(local, uri)
    first = B.fetch_weights("mobilenetv2", uri, True, storage=storage, cache_dir=tmp_path / "c")
    storage.delete(uri)  # a second build (the next trial) does not go back to the bucket
    again = B.fetch_weights("mobilenetv2", uri, True, storage=storage, cache_dir=tmp_path / "c")
    assert first.weights == again.weights
    assert B.md5(first.weights) == B.md5(local)


# ---------------------------------------------------------------------------
# The product with a backbone: the chief, the retrain


def test_the_chief_fails_the_search_at_once_when_the_weights_are_missing(
        emulator, storage, bucket, tmp_path):
    from conftest import free_port
    from skin.tuning import load_result, run_chief

    missing = f"gs://{bucket}/weights/missing.h5"
    exp = experiment(bucket, name="mobilenetv2", weights=missing)
    runtime = Runtime(tuner_id="chief", oracle_port=free_port(), work_dir=tmp_path / "work")
    assert run_chief(RoleContext(exp, runtime, storage)) == 4
    result = load_result(storage, exp).to_json()
    assert result["outcome"] == "failed"
    assert f"backbone.weights: '{missing}' does not exist" in result["reason"]


@pytest.mark.slow
def test_retrain_publishes_a_model_on_bucket_weights(donor, emulator, real_or_synthetic_images,
                                                     tmp_path):
    from skin.staging.stage import stage

    bucket = f"bb-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    from skin.infra.storage import Storage

    storage = Storage()
    local = tmp_path / "donor.weights.h5"
    donor.save_weights(local)
    uri = f"gs://{bucket}/weights/donor.weights.h5"
    storage.upload_file(local, uri)
    exp = experiment(bucket, real_or_synthetic_images, name="mobilenetv2", weights=uri,
                     trainable=False)
    stage(exp, storage)
    best = {"trial_id": "0003", "score": 0.7, "objective": "val_auc", "epochs": 2,
            "hyperparameters": {"pooling": "avg", "dense_units": 0, "dropout": 0.0,
                                "optimizer": "adam", "learning_rate": 1e-3,
                                "weight_decay": 0.0, "lr_schedule": "constant",
                                "label_smoothing": 0.0, "augment": 0.0, "mixup": 0.0,
                                "class_weight": False, "batch_size": 16}}
    published = rt.retrain(RoleContext(exp, Runtime(work_dir=tmp_path / "work"), storage),
                           best=best)

    metrics = json.loads(storage.read_text(join(published.uri, "metrics.json")))
    assert metrics["backbone"] == {"name": "mobilenetv2", "weights": uri, "trainable": False}
    card = storage.read_text(join(published.uri, "model_card.md"))
    assert f"A CNN on a mobilenetv2 backbone (weights from `{uri}`; frozen" in card
    model_path = tmp_path / "model.keras"
    storage.download_file(join(published.uri, "model.keras"), model_path)
    import skin.model.inference  # noqa: F401 -- registers the layers the published model uses

    model = keras.models.load_model(model_path, safe_mode=True)
    # The frozen backbone is published with the weights it was given.
    assert same_weights(nested(model), donor)


# ---------------------------------------------------------------------------
# EfficientNet-Lite0 with the ImageNet weights imported from the shipped PyTorch checkpoint


@pytest.fixture(scope="module")
def lite0_state():
    from skin.model import checkpoint as ckpt
    from skin.model import weights as W

    return ckpt.read_checkpoint(W.packaged_checkpoint())


def imported_lite0(storage, bucket, tmp_path) -> str:
    """`skin weights import` of the shipped checkpoint into the bucket; its gs:// URI."""
    from skin.cli import main
    from skin.model import weights as W

    uri = f"gs://{bucket}/weights/efficientnet_lite0.weights.h5"
    assert main(["weights", "import", "--from", str(W.packaged_checkpoint()), "--backbone",
                 "efficientnet_lite0", "--out", uri]) == 0
    assert storage.exists(uri)
    return uri


def test_lite0_gets_0_to_255_pixels_and_scales_them_as_its_checkpoint_expects():
    """The product feeds backbones float 0..255 (skin.data.dataset); Lite0's first layer maps them to
    (x - 127) / 128, what its ImageNet checkpoint was trained on; no other layer rescales."""
    model = M.SkinHyperModel(experiment(name="efficientnet_lite0")).build(
        keras_tuner.HyperParameters())
    net = nested(model)
    assert model.inputs[0].shape[1:] == (SIZE, SIZE, 3)
    assert [la.name for la in model.layers if isinstance(la, keras.layers.Rescaling)] == []
    (rescale,) = [la for la in net.layers if isinstance(la, keras.layers.Rescaling)]
    x = images(2)
    np.testing.assert_allclose(np.asarray(rescale(x)), (x - 127.0) / 128.0, rtol=1e-6, atol=1e-6)
    assert net.layers[1] is rescale  # right after the input


@pytest.mark.slow
def test_imported_lite0_weights_classify_a_photograph_through_the_product_model(
        lite0_state, emulator, storage, bucket, tmp_path):
    """The weights imported into a bucket, the product's model built at 224 px on them, the
    photograph read by the product's own image path (skin.data.dataset.load_images): the pooled
    features, with the checkpoint's ImageNet classifier, give the cat its class."""
    from PIL import Image
    from skimage import data

    uri = imported_lite0(storage, bucket, tmp_path)
    exp = experiment(bucket, name="efficientnet_lite0", weights=uri, trainable=True)
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, image_size=224))
    hp = keras_tuner.HyperParameters()
    hp.values.update(pooling="avg", augment=0.5)
    model = M.SkinHyperModel(exp, storage=storage, cache_dir=tmp_path / "cache").build(hp)
    net = nested(model)
    # Pretrained: batch norm frozen (inference mode) while the rest is fine-tuned.
    norms = [la for la in net.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert len(norms) == 49 and not any(la.trainable for la in norms)
    assert net.trainable and len(net.trainable_weights) > 0

    Image.fromarray(data.chelsea()).save(tmp_path / "chelsea.png")
    from skin.data.dataset import load_images

    x = load_images([tmp_path / "chelsea.png"], 224)
    assert x.dtype == np.float32 and 100 < x.max() <= 255
    features = keras.Model(model.inputs, model.get_layer("pool").output).predict(x, verbose=0)
    logits = features @ lite0_state["_fc.weight"].T + lite0_state["_fc.bias"]
    assert int(logits.argmax()) in range(281, 286), int(logits.argmax())


@pytest.mark.slow
def test_retrain_publishes_a_lite0_model_on_imported_weights_with_tta(
        lite0_state, emulator, real_or_synthetic_images, tmp_path):
    from skin.infra.storage import Storage
    from skin.model import weights as W
    from skin.staging.stage import stage

    bucket = f"lite-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    storage = Storage()
    uri = imported_lite0(storage, bucket, tmp_path)
    exp = experiment(bucket, real_or_synthetic_images, name="efficientnet_lite0", weights=uri,
                     trainable=True)
    exp = dataclasses.replace(exp, retrain=dataclasses.replace(exp.retrain, tta=True))
    stage(exp, storage)
    best = {"trial_id": "0001", "score": 0.7, "objective": "val_auc", "epochs": 1,
            "hyperparameters": {"pooling": "avg", "dense_units": 0, "dropout": 0.2,
                                "optimizer": "adamw", "learning_rate": 1e-4,
                                "weight_decay": 1e-4, "lr_schedule": "cosine",
                                "label_smoothing": 0.0, "augment": 0.25, "mixup": 0.0,
                                "class_weight": False, "batch_size": 16}}
    published = rt.retrain(RoleContext(exp, Runtime(work_dir=tmp_path / "work"), storage),
                           best=best)
    metrics = json.loads(storage.read_text(join(published.uri, "metrics.json")))
    assert metrics["backbone"] == {"name": "efficientnet_lite0", "weights": uri, "trainable": True}
    model_path = tmp_path / "model.keras"
    storage.download_file(join(published.uri, "model.keras"), model_path)
    import skin.model.inference  # noqa: F401 -- registers the TTA layers

    model = keras.models.load_model(model_path, safe_mode=True)
    assert model.get_layer("tta_views") is not None
    member = nested(model)
    net = nested(member)
    imported = W.convert(lite0_state, "efficientnet_lite0", image_size=SIZE)
    # Fine-tuned (kernels moved), batch-norm statistics those of the checkpoint.
    for w, start in zip(net.weights, imported.weights):
        if "moving_" in w.path:
            np.testing.assert_array_equal(w.numpy(), start.numpy())
    assert any(not np.array_equal(w.numpy(), s.numpy()) for w, s in
               zip(net.weights, imported.weights) if w.path.endswith("kernel"))
    p = model.predict(images(4), verbose=0)
    assert p.shape == (4, 1) and np.all((p >= 0) & (p <= 1))
