"""skin.model.hypermodel: the search space builds valid, compiled, loadable models that train; skin.model.inference:
the published model over members and views."""

from __future__ import annotations

import shutil
import uuid

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

from skin.errors import ConfigError
from skin.infra.config import API_VERSION, KIND, parse_experiment
from skin.model import hypermodel as M
from skin.model import inference

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


@pytest.mark.slow
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
    from skin.data.dataset import sync_data
    from skin.infra.storage import Storage
    from skin.staging.stage import stage

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


@pytest.mark.slow
def test_a_confirmation_trials_fold_moves_validation_for_both_datasets(staged_dir, monkeypatch):
    from skin.data import dataset as skin_data

    exp, data_dir = staged_dir
    calls, real = [], skin_data.dataset

    def recorded(local, split, *args, **kw):  # the real pipeline, its arguments noted
        calls.append((split, kw.get("fold")))
        return real(local, split, *args, **kw)

    class Batches(keras.callbacks.Callback):
        train = test = 0

        def on_train_batch_end(self, batch, logs=None):
            Batches.train += 1

        def on_test_batch_end(self, batch, logs=None):
            Batches.test += 1

    monkeypatch.setattr(skin_data, "dataset", recorded)
    hm = M.SkinHyperModel(exp)
    hp = hyperparameters(batch_size=16, blocks=3, filters=16, **{M.SEED_KEY: 1, M.FOLD_KEY: 2})
    assert M.trial_fold(hp) == 2 and M.trial_fold(hyperparameters(batch_size=16)) is None
    hm.fit(hp, hm.build(hp), data_dir=data_dir, epochs=1, callbacks=[Batches()])
    assert calls == [("train", 2), ("validation", 2)]
    assert Batches.train == -(-skin_data.split_size(data_dir, "train", 2) // 16)
    assert Batches.test == -(-skin_data.split_size(data_dir, "validation", 2) // 16)
    counts = skin_data.class_counts(data_dir, "train", 2)
    assert M._split_counts(data_dir, "train", 2) == (sum(counts.values()), counts["benign"],
                                                     counts["malignant"])


def test_shipped_experiments_pin_only_real_hyperparameters():
    from skin.infra.config import DEFAULT_EXPERIMENT_FILE, PACKAGE_EXPERIMENTS, load_experiment

    for path in sorted(PACKAGE_EXPERIMENTS.glob("*.yaml")):
        exp = load_experiment(path, env={})
        M.validate_fixed(exp.search.fixed)
        hp = keras_tuner.HyperParameters()
        hm = M.SkinHyperModel(exp)
        # Weights in a bucket (pretrained.yaml) are for the pipeline; the space is the same.
        if exp.backbone.weights:
            hm.values(hp)
        else:
            hm.build(hp)
        assert {k: hp.values[k] for k in exp.search.fixed} == exp.search.fixed
    assert load_experiment(DEFAULT_EXPERIMENT_FILE, env={}).search.fixed  # the recipe is pinned


# ---------------------------------------------------------------------------
# The published model: test-time augmentation over the dihedral views, ensembles


def dihedral_views(x: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square, by numpy: rotations of x and of its mirror image."""
    return [np.ascontiguousarray(np.rot90(v, k, axes=(1, 2)))
            for v in (x, x[:, :, ::-1]) for k in range(4)]


def orientation_sensitive_model(seed: int) -> keras.Model:
    """A real model of the search space whose head sees positions (flatten), trained a step so
    batch-norm statistics are not the identity."""
    keras.utils.set_random_seed(seed)
    hm = M.SkinHyperModel(experiment())
    model = hm.build(hyperparameters(**{**CORNERS[0], "blocks": 3, "augment": 0.0}))
    model.fit(images(8, seed), np.tile(np.array([0, 1], "float32"), 4), epochs=1, batch_size=8,
              verbose=0)
    return model


@pytest.fixture(scope="module")
def members():
    return [orientation_sensitive_model(1), orientation_sensitive_model(2)]


@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_dihedral_views_layer_stacks_the_views_view_major(views):
    x = images(3)
    out = inference.DihedralViews(views)(x).numpy()
    assert out.shape == (views * 3, SIZE, SIZE, 3)
    expected = {0: x, 1: x[:, :, ::-1], 2: x[:, ::-1], 3: x[:, ::-1, ::-1]}
    for v in range(min(views, 4)):
        np.testing.assert_array_equal(out[3 * v:3 * v + 3], expected[v])
    if views == 8:  # as a set, the 8 views are the dihedral group
        got = sorted(out[3 * v:3 * v + 3].tobytes() for v in range(8))
        assert got == sorted(v.tobytes() for v in dihedral_views(x))


def test_tta_model_is_the_mean_over_the_eight_views(members):
    base = members[0]
    tta = inference.inference_model([base], tta=True)
    x = images(4, seed=5)
    expected = np.mean([base.predict_on_batch(v) for v in dihedral_views(x)], axis=0)
    got = tta.predict_on_batch(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The base model does depend on orientation, so the equality above says something ...
    assert np.abs(base.predict_on_batch(x) - got).max() > 1e-4
    # ... and the TTA model does not: any view of the input gives the same output.
    for view in dihedral_views(x)[1:]:
        np.testing.assert_allclose(tta.predict_on_batch(view), got, rtol=1e-5, atol=1e-6)


def test_one_member_without_tta_is_published_as_it_is(members):
    assert inference.inference_model(members[:1]) is members[0]


def test_ensemble_is_the_mean_of_its_members(members):
    x = images(5, seed=6)
    separate = [m.predict_on_batch(x) for m in members]
    assert np.abs(separate[0] - separate[1]).max() > 1e-4  # two different models
    ensemble = inference.inference_model(members)
    np.testing.assert_allclose(ensemble.predict_on_batch(x), np.mean(separate, axis=0),
                               rtol=1e-5, atol=1e-6)
    both = inference.inference_model(members, tta=True)
    expected = np.mean([m.predict_on_batch(v) for m in members for v in dihedral_views(x)], axis=0)
    np.testing.assert_allclose(both.predict_on_batch(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tta_ensemble_saves_loads_in_safe_mode_and_exports(members, tmp_path):
    import subprocess
    import sys

    from skin.publishing.publish import export_saved_model

    model = inference.inference_model(members, tta=True)
    x = images(3, seed=7)
    expected = model.predict_on_batch(x)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True, compile=False)
    np.testing.assert_allclose(loaded.predict_on_batch(x), expected, rtol=1e-5, atol=1e-6)
    names = {type(layer).__name__ for layer in loaded.layers}
    assert {"DihedralViews", "ViewMean", "Average"} <= names and "Lambda" not in names
    export_saved_model(loaded, tmp_path / "saved_model", SIZE)
    exported = tf.saved_model.load(str(tmp_path / "saved_model"))
    np.testing.assert_allclose(np.asarray(exported.serve(x)), expected, rtol=1e-5, atol=1e-5)
    # A fresh process that only knows skin.serving.contract loads it (the layers register themselves).
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np; from skin.serving.contract import load_published\n"
            "m, _ = load_published(sys.argv[1]); x = np.load(sys.argv[2])\n"
            "np.save(sys.argv[3], m.predict_on_batch(x))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "p.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-5, atol=1e-6)


def test_inference_model_rejects_mismatched_members(members):
    other = M.SkinHyperModel(experiment(image_size=48)).build(hyperparameters(blocks=3))
    with pytest.raises(ValueError, match="member 1"):
        inference.inference_model([members[0], other])
    with pytest.raises(ValueError, match="views"):
        inference.DihedralViews(3)
