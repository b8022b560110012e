"""skin.model: the search space builds valid, compiled, loadable models that train."""

from __future__ import annotations

import shutil
import uuid

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

from skin import model as M
from skin.config import API_VERSION, KIND, parse_experiment
from skin.errors import ConfigError

SIZE = 32


def experiment(fixed=None, **data):
    return parse_experiment({
        "apiVersion": API_VERSION, "kind": KIND, "name": "model-test",
        "data": {"image_size": SIZE, **data},
        "search": {"fixed": fixed or {}}}, env={})


def sampled_hyperparameters(hypermodel, seed: int) -> keras_tuner.HyperParameters:
    """One random point of the search space (what a tuner's first trials see)."""
    hp = keras_tuner.HyperParameters()
    hypermodel.build(hp)  # registers the space with its defaults
    rng = np.random.default_rng(seed)
    for param in hp.space:
        if isinstance(param, keras_tuner.engine.hyperparameters.Fixed):
            continue
        hp.values[param.name] = param.random_sample(int(rng.integers(1 << 30)))
    return hp


def hyperparameters(**values) -> keras_tuner.HyperParameters:
    hp = keras_tuner.HyperParameters()
    hp.values.update(values)
    return hp


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


CORNERS = [
    dict(block_type="plain", batch_norm=False, pooling="flatten", dense_units=0, dropout=0.0,
         optimizer="adam", blocks=5),
    dict(block_type="separable", pooling="max", kernel_size=5, optimizer="sgd",
         weight_decay=1e-3, augment=1.0, blocks=3),
    dict(block_type="residual", pooling="avg", augment=0.0, optimizer="adamw", filters=16),
]


@pytest.mark.parametrize("values", [None, 0, 1, 2, *CORNERS],
                         ids=["defaults", "sample0", "sample1", "sample2", "plain-flatten",
                              "separable-max", "residual-avg"])
def test_build_shapes_and_compile(values):
    hm = M.SkinHyperModel(experiment())
    if values is None:
        hp = keras_tuner.HyperParameters()
    elif isinstance(values, int):
        hp = sampled_hyperparameters(hm, values)
    else:
        hp = hyperparameters(**values)
    model = hm.build(hp)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert model.inputs[0].dtype == "float32"
    assert model.output_shape == (None, 1)
    assert set(M.HYPERPARAMETER_NAMES) <= set(hp.values)
    if isinstance(values, dict):
        assert {k: hp.values[k] for k in values} == values
    out = model.evaluate(images(4), np.array([0, 1, 0, 1], "float32"), verbose=0,
                         return_dict=True)
    assert {"loss", "auc", "accuracy"} <= set(out)
    p = model.predict(images(4), verbose=0)
    assert np.all((p >= 0) & (p <= 1))


def test_every_name_is_a_hyperparameter_of_the_space():
    hp = keras_tuner.HyperParameters()
    M.SkinHyperModel(experiment()).build(hp)
    assert sorted(M.HYPERPARAMETER_NAMES) == sorted(hp.values)


def test_validate_fixed_names_the_unknown_key():
    M.validate_fixed({"blocks": 3, "learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"search\.fixed\.block_count"):
        M.validate_fixed({"blocks": 3, "block_count": 4})
    with pytest.raises(ConfigError, match=r"search\.fixed\.lr\b"):
        M.SkinHyperModel(experiment(fixed={"lr": 0.1}))


def test_fixed_hyperparameters_are_not_searched():
    hm = M.SkinHyperModel(experiment(fixed={"blocks": 3, "pooling": "flatten"}))
    hp = keras_tuner.HyperParameters()
    model = hm.build(hp)
    names = {p.name for p in hp.space if not isinstance(p, keras_tuner.engine.hyperparameters.Fixed)}
    assert "blocks" not in names and "pooling" not in names and "filters" in names
    assert hp.values["blocks"] == 3
    assert any(isinstance(layer, keras.layers.Flatten) for layer in model.layers)
    assert sum(layer.name.endswith("_pool") and "block" in layer.name for layer in model.layers) == 3


def test_augmentation_only_while_training():
    model = M.SkinHyperModel(experiment()).build(hyperparameters(augment=1.0, dropout=0.0))
    x = images(8)
    first, second = model.predict(x, verbose=0), model.predict(x, verbose=0)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(model(x, training=False).numpy(), first, rtol=1e-5, atol=1e-6)
    # the same model does augment in training mode (so the layers are really there)
    assert not np.allclose(model(x, training=True).numpy(), model(x, training=True).numpy())


def test_save_and_load_in_safe_mode_round_trips(tmp_path):
    hm = M.SkinHyperModel(experiment())
    model = hm.build(sampled_hyperparameters(hm, 3))
    x, y = images(16), np.tile(np.array([0, 1], "float32"), 8)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # batch-norm statistics move
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in loaded.layers)


def test_warmup_cosine_schedule():
    sched = M.WarmupCosine(peak=0.01, epochs=10, steps_per_epoch=5)
    rates = [sched.rate(step) for step in range(50)]
    assert rates[0] < rates[2] < rates[4] == pytest.approx(0.01)  # one warm-up epoch
    assert all(a >= b for a, b in zip(rates[5:], rates[6:]))  # then only down
    assert rates[-1] < 0.0005
    constant = M.WarmupCosine(peak=0.01, epochs=10, steps_per_epoch=5, cosine=False)
    assert constant.rate(49) == pytest.approx(0.01)


def test_mixup_keeps_shapes_and_mixes_labels():
    x = tf.constant(images(16))
    y = tf.constant(np.tile(np.array([0, 1], "float32"), 8))
    mx, my = M.mixup(x, y, 0.4, seed=1)
    assert mx.shape == x.shape and my.shape == y.shape
    my = my.numpy()
    assert np.all((my >= 0) & (my <= 1)) and np.any((my > 0.01) & (my < 0.99))


def test_fit_datasets_trains_and_reports_validation_auc():
    keras.utils.set_random_seed(0)
    values = dict(M._define(keras_tuner.HyperParameters(), {}), augment=0.0, mixup=0.2,
                  class_weight=True, batch_size=16, learning_rate=3e-3)
    model = M.build_model(values, SIZE)
    rng = np.random.default_rng(0)
    y = (rng.random(64) < 0.5).astype("float32")
    x = images(64) * 0.3 + y[:, None, None, None] * 150  # learnable: bright = malignant
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    before = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    hist = M.fit_datasets(values, model, ds, ds, epochs=3, steps_per_epoch=4,
                          class_counts=(int((y == 0).sum()), int((y == 1).sum())))
    assert {"val_auc", "val_accuracy", "learning_rate"} <= set(hist.history)
    assert model.evaluate(ds, verbose=0, return_dict=True)["loss"] < before


@pytest.fixture(scope="module")
def staged_dir(real_or_synthetic_images, emulator, tmp_path_factory):
    """The small real (or synthetic) folder, staged and synced like a worker does."""
    from skin.data import sync_data
    from skin.stage import stage
    from skin.storage import Storage

    src = tmp_path_factory.mktemp("model-src") / "source"
    shutil.copytree(real_or_synthetic_images, src, symlinks=True)
    bucket = f"t-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    exp = parse_experiment({
        "apiVersion": API_VERSION, "kind": KIND, "name": "model-fit",
        "storage": {"bucket": bucket, "prefix": ""},
        "data": {"source": str(src), "image_size": SIZE, "validation_fraction": 0.25,
                 "test_fraction": 0.0, "shards": 2, "seed": 1}}, env={})
    storage = Storage()
    stage(exp, storage, work_dir=tmp_path_factory.mktemp("model-work"))
    return exp, sync_data(storage, exp.data_uri, tmp_path_factory.mktemp("model-data") / "data")


@pytest.mark.slow
def test_hypermodel_fit_on_staged_data(staged_dir):
    exp, data_dir = staged_dir
    hm = M.SkinHyperModel(exp)
    hp = hyperparameters(batch_size=16, blocks=3, filters=16)
    model = hm.build(hp)
    hist = hm.fit(hp, model, data_dir=data_dir, epochs=2)
    assert isinstance(hist, keras.callbacks.History)
    assert len(hist.history["val_auc"]) == 2
    assert np.all(np.isfinite(hist.history["loss"]))
    # Hyperband continues a trial part-way: initial_epoch is honoured
    hist = hm.fit(hp, model, data_dir=data_dir, epochs=3, initial_epoch=2, validation=False)
    assert len(hist.history["loss"]) == 1 and "val_auc" not in hist.history


def test_shipped_experiments_pin_only_real_hyperparameters():
    from skin.config import DEFAULT_EXPERIMENT_FILE, PACKAGE_EXPERIMENTS, load_experiment

    for path in sorted(PACKAGE_EXPERIMENTS.glob("*.yaml")):
        exp = load_experiment(path, env={})
        M.validate_fixed(exp.search.fixed)
        hp = keras_tuner.HyperParameters()
        M.SkinHyperModel(exp).build(hp)
        assert {k: hp.values[k] for k in exp.search.fixed} == exp.search.fixed
    assert load_experiment(DEFAULT_EXPERIMENT_FILE, env={}).search.fixed  # the recipe is pinned
