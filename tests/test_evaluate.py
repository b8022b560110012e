"""skin.serving.scoring's metric functions (exact, against hand-computed values), skin.serving.contract's
model resolution and loading in safe mode (local and through the storage emulator), and
skin.serving.evaluate's `evaluate`/`predict` on folders of real images with broken files mixed in."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from skin.data import images
from skin.errors import ConfigError, DataError, DocumentError
from skin.infra import artifacts
from skin.serving import contract as serving
from skin.serving import evaluate as ev
from skin.serving import scoring

# ---------------------------------------------------------------------------
# Metric functions


@pytest.mark.parametrize("labels, scores, expected", [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
    ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
    ([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], 0.0),
    ([0, 1], [0.5, 0.5], 0.5),                      # a tie counts half
    ([0, 0, 1], [0.2, 0.6, 0.6], 0.75),             # (1 + 0.5) / 2
    ([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.5], 0.5),  # 3 of 6 pairs ordered
    ([0, 0, 0, 1, 1, 1], [0.1, 0.6, 0.2, 0.7, 0.4, 0.9], 8 / 9),
])
def test_roc_auc_hand_computed(labels, scores, expected):
    assert scoring.roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_roc_auc_is_nan_without_both_classes(labels):
    assert math.isnan(scoring.roc_auc(labels, [0.5] * len(labels)))


@pytest.mark.parametrize("labels, scores, fpr, tpr, thresholds", [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8],
     [0, 0, 0.5, 0.5, 1], [0, 0.5, 0.5, 1, 1], [np.inf, 0.8, 0.4, 0.35, 0.1]),
    ([0, 1, 1, 0], [0.5, 0.5, 0.9, 0.1],            # tied scores make one point
     [0, 0, 0.5, 1], [0, 0.5, 1, 1], [np.inf, 0.9, 0.5, 0.1]),
])
def test_roc_curve_hand_computed(labels, scores, fpr, tpr, thresholds):
    got_fpr, got_tpr, got_thr = scoring.roc_curve(labels, scores)
    np.testing.assert_allclose(got_fpr, fpr)
    np.testing.assert_allclose(got_tpr, tpr)
    np.testing.assert_array_equal(got_thr, thresholds)


def test_roc_curve_area_equals_rank_auc_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) * 0.6 + labels * 0.3, 1)  # many ties
    fpr, tpr, _ = scoring.roc_curve(labels, scores)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(scoring.roc_auc(labels, scores), abs=1e-12)
    assert 0.5 < area < 1.0


def test_roc_curve_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        scoring.roc_curve([1, 1], [0.2, 0.3])


@pytest.mark.parametrize("threshold, expected", [
    (0.4, [[1, 1], [1, 1]]),     # a score equal to the threshold is malignant
    (0.35, [[1, 1], [0, 2]]),
    (0.0, [[0, 2], [0, 2]]),
    (0.81, [[2, 0], [2, 0]]),
])
def test_confusion_matrix_hand_computed(threshold, expected):
    assert scoring.confusion_matrix([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold) == expected


TENTHS = [round(0.1 * i, 1) for i in range(1, 11)]  # ten malignant scores 0.1 .. 1.0


@pytest.mark.parametrize("labels, scores, target, expected", [
    ([1] * 10, TENTHS, 0.9, 0.2),        # 9 of 10 must stay >= t: the 9th highest
    ([1] * 10, TENTHS, 0.7, 0.4),        # 0.7 * 10 is 7.000000000000001 in floats: still 7
    ([1] * 10, TENTHS, 1.0, 0.1),        # everything: the lowest malignant score
    ([1] * 10, TENTHS, 0.05, 1.0),       # at least one
    ([1] * 10, TENTHS, 0.91, 0.1),       # 9.1 -> 10 needed
    ([1, 1, 1, 1], [0.8, 0.8, 0.8, 0.2], 0.5, 0.8),   # ties: 3 of 4 kept at 0.8
    ([0, 1, 0, 1], [0.99, 0.6, 0.7, 0.3], 0.5, 0.6),  # benign scores do not matter
    ([0, 0, 0], [0.1, 0.2, 0.3], 0.9, scoring.DEFAULT_THRESHOLD),  # no malignant: the default
])
def test_choose_threshold_hand_computed(labels, scores, target, expected):
    assert scoring.choose_threshold(labels, scores, target) == pytest.approx(expected)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01])
def test_choose_threshold_rejects_targets_out_of_range(target):
    with pytest.raises(ValueError, match="target_sensitivity"):
        scoring.choose_threshold([0, 1], [0.1, 0.9], target)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_choose_threshold_is_the_highest_that_keeps_the_target(seed, target):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 101)
    labels[:2] = 1
    scores = np.round(rng.random(101), 2)  # ties included
    t = scoring.choose_threshold(labels, scores, target)
    malignant = scores[labels == 1]

    def sensitivity(threshold):
        return np.mean(malignant >= threshold)

    assert sensitivity(t) >= target
    higher = malignant[malignant > t]
    if higher.size:  # the next threshold that changes anything loses the target
        assert sensitivity(higher.min()) < target
    assert sensitivity(np.nextafter(t, 2.0)) < target


def test_classification_metrics_hand_computed():
    m = scoring.classification_metrics([0, 0, 0, 1, 1, 1], [0.1, 0.6, 0.2, 0.7, 0.4, 0.9], 0.5)
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert (m["n"], m["n_benign"], m["n_malignant"]) == (6, 3, 3)
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
        assert m[key] == pytest.approx(2 / 3), key
    assert m["roc_auc"] == pytest.approx(8 / 9)
    assert m["threshold"] == 0.5


def test_classification_metrics_asymmetric_case():
    # tn=3 fp=1 fn=2 tp=4
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.9, 0.4, 0.45, 0.6, 0.7, 0.8, 0.95]
    m = scoring.classification_metrics(labels, scores, 0.5)
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))


@pytest.mark.parametrize("successes, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson, no correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(successes, n, low, high):
    lo, hi = scoring.wilson_interval(successes, n)
    assert (lo, hi) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_wilson_interval_edges():
    lo, hi = scoring.wilson_interval(0, 29)
    assert scoring.wilson_interval(29, 29) == [pytest.approx(1 - hi), 1.0]  # symmetric in p, 1 - p
    assert lo == 0.0
    assert scoring.wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="successes must be in"):
        scoring.wilson_interval(5, 4)


def test_classification_metrics_carry_intervals():
    # tn=3 fp=1 fn=2 tp=4, as above
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.9, 0.4, 0.45, 0.6, 0.7, 0.8, 0.95]
    m = scoring.classification_metrics(labels, scores, 0.5)
    ci = m["intervals_95"]
    assert ci["sensitivity"] == pytest.approx(scoring.wilson_interval(4, 6))
    assert ci["specificity"] == pytest.approx(scoring.wilson_interval(3, 4))
    assert ci["accuracy"] == pytest.approx(scoring.wilson_interval(7, 10))
    for key, (lo, hi) in ci.items():
        assert lo < m[key] < hi, key
    text = ev.format_report({**m, "model": "x", "data": "y"})
    lo, hi = ci["sensitivity"]
    assert f"95 % interval {lo:.3f}-{hi:.3f}" in text
    # No malignant image: no sensitivity interval, and the report still renders.
    m = scoring.classification_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    assert m["intervals_95"]["sensitivity"] is None
    json.dumps(m, allow_nan=False)


def test_classification_metrics_undefined_ratios_are_none_and_json_clean():
    m = scoring.classification_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)  # no malignant, none predicted
    assert m["sensitivity"] is None and m["precision"] is None and m["f1"] is None
    assert m["roc_auc"] is None
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    json.dumps(m, allow_nan=False)
    assert "n/a" in ev.format_report({**m, "model": "x", "data": "y"})


@pytest.mark.parametrize("labels, scores, message", [
    ([0, 2], [0.1, 0.2], "labels must be 0"),
    ([0, 1], [0.1], "differ in length"),
    ([0, 1], [0.1, float("nan")], "NaN"),
])
def test_metric_inputs_are_checked(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        scoring.classification_metrics(labels, scores, 0.5)


def test_format_report_shows_every_figure():
    m = scoring.classification_metrics([0, 0, 0, 1, 1, 1], [0.1, 0.6, 0.2, 0.7, 0.4, 0.9], 0.5)
    m.update(model="gs://b/models/20250101-000000/model.keras", version="20250101-000000",
             data="/data", skipped=[{"path": "/data/benign/x.jpg", "reason": "truncated"}],
             n_skipped=1)
    text = ev.format_report(m)
    for needle in ("20250101-000000", "6 images (3 benign, 3 malignant)", "1 unreadable",
                   "Accuracy      0.667", "ROC AUC       0.889", "Threshold:    0.5000",
                   "/data/benign/x.jpg: truncated"):
        assert needle in text, needle


def test_format_predictions_tsv_csv_json_carry_every_field():
    import csv
    import io

    preds = [ev.Prediction("a.jpg", 0.91234, "malignant", 0.4, model_version="v1"),
             ev.Prediction("b, c.jpg", 0.1, "benign", 0.4, model_version="v1"),
             ev.Prediction("c.jpg", None, None, 0.4, "no such file", model_version="v1")]
    lines = ev.format_predictions(preds).splitlines()
    assert lines == ["path\tprobability\tlabel\tthreshold\tmodel_version\terror",
                     "a.jpg\t0.912340\tmalignant\t0.400000\tv1\t",
                     "b, c.jpg\t0.100000\tbenign\t0.400000\tv1\t",
                     "c.jpg\t\t\t0.400000\tv1\tno such file"]
    rows = list(csv.DictReader(io.StringIO(ev.format_predictions(preds, "csv"))))
    assert [r["path"] for r in rows] == ["a.jpg", "b, c.jpg", "c.jpg"]  # quoted comma
    assert rows[0] == {"path": "a.jpg", "probability": "0.912340", "label": "malignant",
                       "threshold": "0.400000", "model_version": "v1", "error": ""}
    assert json.loads(ev.format_predictions(preds, "json")) == [p.to_dict() for p in preds]
    with pytest.raises(ConfigError, match="--format"):
        ev.format_predictions(preds, "xml")


# ---------------------------------------------------------------------------
# Finding images


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_find_labelled_images_walks_nested_folders_any_case(tmp_path):
    _touch(tmp_path / "Benign" / "a.JPG")
    _touch(tmp_path / "Benign" / "sub" / "deeper" / "b.jpeg")
    _touch(tmp_path / "Benign" / "notes.txt")
    _touch(tmp_path / "Benign" / "._a.jpg")               # macOS resource fork: ignored
    _touch(tmp_path / "Benign" / ".ipynb_checkpoints" / "c.jpg")
    _touch(tmp_path / "malignant" / "m.Png")
    _touch(tmp_path / "other" / "x.jpg")                  # neither class: ignored
    found = ev.find_labelled_images(tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), y) for p, y in found] == [
        ("Benign/a.JPG", 0), ("Benign/sub/deeper/b.jpeg", 0), ("malignant/m.Png", 1)]


def test_find_labelled_images_with_one_class_only(tmp_path):
    _touch(tmp_path / "malignant" / "m.jpg")
    assert [y for _, y in ev.find_labelled_images(tmp_path)] == [1]


@pytest.mark.parametrize("layout, message", [
    ({}, "expected folders benign/ and malignant/"),
    ({"images/a.jpg": b"x"}, "found: images"),
    ({"benign/readme.txt": b"x", "malignant/.keep": b""}, "no images"),
])
def test_find_labelled_images_errors_are_clear(tmp_path, layout, message):
    for rel, data in layout.items():
        _touch(tmp_path / rel, data)
    with pytest.raises(DataError, match=message):
        ev.find_labelled_images(tmp_path)


def test_find_labelled_images_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        ev.find_labelled_images(tmp_path / "nope")


# ---------------------------------------------------------------------------
# Resolving and loading a published model (a tiny hand-made model, real Keras)

SIZE = 32


def tiny_model():
    """Deterministic: P(malignant) = sigmoid((mean red - mean blue) / 20)."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    out = keras.layers.Dense(1, activation="sigmoid", name="malignant")(x)
    model = keras.Model(inputs, out)
    model.get_layer("malignant").set_weights([np.array([[0.05], [0.0], [-0.05]], np.float32),
                                              np.zeros(1, np.float32)])
    return model


def publish_tiny(folder: Path, threshold: float = 0.5, version: str = "20250101-000000",
                 embed: bool = True, beside: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keras_file = folder / artifacts.MODEL
    tiny_model().save(keras_file)
    doc = serving.serving_document(threshold, SIZE, version)
    if embed:
        serving.embed_serving(keras_file, doc)
    if beside:
        (folder / artifacts.SERVING).write_text(json.dumps(doc))
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """<tmp>/models/<version>/ with LATEST, like retrain leaves it."""
    models = tmp_path_factory.mktemp("exp") / "models"
    publish_tiny(models / "20250101-000000", threshold=0.42)
    (models / "LATEST").write_text("20250101-000000\n")
    return models


def test_embedded_serving_keeps_the_archive_loadable_in_safe_mode(published):
    import keras

    keras_file = published / "20250101-000000" / artifacts.MODEL
    with zipfile.ZipFile(keras_file) as zf:
        assert artifacts.SERVING_ARCHIVE_ENTRY in zf.namelist()
    model = keras.models.load_model(keras_file, safe_mode=True)
    x = np.zeros((1, SIZE, SIZE, 3), np.float32)
    x[..., 0] = 100.0
    assert float(model.predict_on_batch(x)[0, 0]) == pytest.approx(1 / (1 + math.exp(-5)), 1e-5)


@pytest.mark.parametrize("relative", [
    "models", "models/LATEST", "models/20250101-000000", "models/20250101-000000/model.keras",
    ".",  # an experiment root: models/LATEST below it
])
def test_load_published_local_forms(published, relative):
    model, info = serving.load_published(published.parent / relative)
    assert info.threshold == pytest.approx(0.42)
    assert (info.image_size, info.class_names, info.version) == (SIZE, images.CLASSES,
                                                                 "20250101-000000")
    assert info.source.endswith("20250101-000000/model.keras")
    assert model.input_shape == (None, SIZE, SIZE, 3)


def test_load_published_from_a_lone_keras_file(published, tmp_path):
    lone = tmp_path / "anywhere.keras"
    shutil.copy(published / "20250101-000000" / artifacts.MODEL, lone)
    _, info = serving.load_published(lone)
    assert info.threshold == pytest.approx(0.42) and info.described


def test_load_published_out_folder_of_skin_run(published, tmp_path):
    shutil.copytree(published / "20250101-000000", tmp_path / "model")
    _, info = serving.load_published(tmp_path)
    assert info.threshold == pytest.approx(0.42)


def test_load_published_serving_json_beside_when_not_embedded(tmp_path):
    publish_tiny(tmp_path / "v", threshold=0.3, embed=False)
    _, info = serving.load_published(tmp_path / "v")
    assert info.threshold == pytest.approx(0.3) and info.described


def test_load_published_refuses_a_serving_json_of_another_shape(tmp_path):
    publish_tiny(tmp_path / "v", embed=False)
    (tmp_path / "v" / artifacts.SERVING).write_text(json.dumps({"threshold": "high"}))
    with pytest.raises(DocumentError, match="serving.json: 'threshold' is 'high'"):
        serving.load_published(tmp_path / "v")


def test_load_published_without_description_uses_default_threshold(tmp_path):
    publish_tiny(tmp_path / "v", embed=False, beside=False)
    _, info = serving.load_published(tmp_path / "v")
    assert info.threshold == scoring.DEFAULT_THRESHOLD and not info.described
    assert info.image_size == SIZE  # from the model's input


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no such file or folder"),
    (lambda d: d, "no published model there"),
    (lambda d: _touch(d / "model.h5"), "not a .keras file"),
    (lambda d: _touch(d / "LATEST", b"../../etc\n"), "not a model version"),
    (lambda d: _touch(d / "model.keras", b"not a zip"), "cannot be loaded"),
])
def test_load_published_local_errors(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message):
        serving.load_published(make(tmp_path))


def test_load_published_refuses_unsafe_lambda(tmp_path):
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    out = keras.layers.Lambda(lambda t: t[:, 0, 0, :1])(inputs)
    keras.Model(inputs, out).save(tmp_path / "model.keras")
    with pytest.raises(ConfigError, match="safe mode.*safe_mode=False"):
        serving.load_published(tmp_path)


@pytest.mark.parametrize("suffix", ["", "/", "/LATEST", "/20250101-000000",
                                    "/20250101-000000/model.keras"])
def test_load_published_from_the_bucket(published, storage, bucket, suffix):
    root = f"gs://{bucket}/experiments/exp"
    storage.upload_dir(published, f"{root}/models")
    _, info = serving.load_published(f"{root}/models{suffix}", storage)
    assert info.threshold == pytest.approx(0.42) and info.version == "20250101-000000"
    assert info.source == f"{root}/models/20250101-000000/model.keras"


def test_load_published_experiment_root_in_the_bucket(published, storage, bucket):
    root = f"gs://{bucket}/exp"
    storage.upload_dir(published, f"{root}/models")
    _, info = serving.load_published(root, storage)
    assert info.version == "20250101-000000"


@pytest.mark.parametrize("suffix, message", [
    ("/models", "no published model there"),
    ("/models/LATEST", "no model published yet"),
    ("/models/x.keras", "no such object"),
])
def test_load_published_bucket_errors(storage, bucket, suffix, message):
    with pytest.raises(ConfigError, match=message):
        serving.load_published(f"gs://{bucket}/exp{suffix}", storage)


# ---------------------------------------------------------------------------
# evaluate / predict on folders of real images (skin.data.dataset.load_images decodes them)


def _write_broken_and_odd_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Add unreadable files (returned first) and odd-but-valid ones (second) to a labelled folder."""
    from PIL import Image

    real = sorted((folder / "malignant").iterdir())[0].resolve()
    broken = [
        _touch(folder / "benign" / "broken" / "zero.jpg", b""),
        _touch(folder / "benign" / "not-an-image.PNG", b"hello, I am text"),
        _touch(folder / "malignant" / "truncated.jpg", real.read_bytes()[:100]),
    ]
    rgb = Image.open(real).convert("RGB")
    odd = [folder / "malignant" / "nested" / "UPPER.JPG", folder / "benign" / "gray.png",
           folder / "malignant" / "alpha.png", folder / "benign" / "cmyk.jpeg"]
    odd[0].parent.mkdir(parents=True)
    rgb.save(odd[0], "JPEG")
    rgb.convert("L").save(odd[1])
    rgb.convert("RGBA").save(odd[2])
    rgb.convert("CMYK").save(odd[3], "JPEG")
    _touch(folder / "benign" / "README.txt", b"not an image and not counted")
    return broken, odd


def _one_by_one(model_dir: Path, folder: Path, skip: set[str]):
    """Labels and P(malignant) image by image: the reference for the batched evaluate."""
    from PIL import Image

    from skin.data.dataset import load_images

    model, info = serving.load_published(model_dir)
    labels, probs = [], []
    for path, label in ev.find_labelled_images(folder):
        if str(path) in skip:
            continue
        try:
            x = load_images([str(path)], info.image_size)
        except Exception:  # noqa: BLE001 - the same Pillow fallback evaluate documents
            tmp = folder.parent / "one-by-one.png"
            Image.open(path).convert("RGB").save(tmp)
            x = load_images([str(tmp)], info.image_size)
        labels.append(label)
        probs.append(float(serving.malignant_probability(model, x)[0]))
    return np.array(labels), np.array(probs)


def test_evaluate_folder_with_broken_files(image_folder, tmp_path):
    # Not 0.5: a grayscale image (red == blue) scores exactly 0.5 with the tiny model, and
    # batched and one-by-one inference may round it to either side (CI saw both).
    model_dir = publish_tiny(tmp_path / "model", threshold=0.501)
    broken, odd = _write_broken_and_odd_files(image_folder)
    out = tmp_path / "reports" / "eval.json"

    result = ev.evaluate(model_dir, image_folder, out, batch_size=7)

    assert sorted(s["path"] for s in result["skipped"]) == sorted(map(str, broken))
    assert result["n_skipped"] == 3 and all(s["reason"] for s in result["skipped"])
    n_files = len(ev.find_labelled_images(image_folder))
    assert result["files_found"] == n_files and result["n"] == n_files - 3
    labels, probs = _one_by_one(model_dir, image_folder, {str(p) for p in broken})
    expected = scoring.classification_metrics(labels, probs, 0.501)
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert result["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)
    assert (result["threshold"], result["version"]) == (0.501, "20250101-000000")
    assert json.loads(out.read_text()) == result
    report = ev.format_report(result)
    assert "3 unreadable skipped" in report and "zero.jpg" in report


def test_evaluate_without_any_readable_image(tmp_path):
    model_dir = publish_tiny(tmp_path / "model")
    _touch(tmp_path / "data" / "benign" / "a.jpg", b"")
    _touch(tmp_path / "data" / "malignant" / "b.png", b"nope")
    with pytest.raises(DataError, match="none of the 2 images could be read"):
        ev.evaluate(model_dir, tmp_path / "data")


def test_predict_one_per_image_in_order(real_or_synthetic_images, tmp_path):
    model_dir = publish_tiny(tmp_path / "model", threshold=0.5)
    images = sorted(real_or_synthetic_images.rglob("*.jpg"))[:3]
    bad = _touch(tmp_path / "bad.jpg", b"\xff\xd8 broken")
    asked = [images[0], tmp_path / "missing.jpg", bad, *images[1:]]

    preds = ev.predict(model_dir, asked)

    assert [p.path for p in preds] == [str(p) for p in asked]
    assert [p.error is None for p in preds] == [True, False, False, True, True]
    assert preds[1].error == "no such file"
    for p in preds:
        if p.error is None:
            assert 0.0 <= p.probability <= 1.0
            assert p.label == ("malignant" if p.probability >= 0.5 else "benign")
    from skin.data.dataset import load_images

    model, _ = serving.load_published(model_dir)
    direct = serving.malignant_probability(model, load_images([str(images[0])], SIZE))[0]
    assert preds[0].probability == pytest.approx(float(direct), abs=1e-6)
    lines = ev.format_predictions(preds).splitlines()[1:]
    assert len(lines) == len(asked)
    assert all(line.startswith(str(path)) for line, path in zip(lines, asked))


def test_predict_expands_folders_and_needs_images(real_or_synthetic_images, tmp_path):
    model_dir = publish_tiny(tmp_path / "model")
    preds = ev.predict(model_dir, [real_or_synthetic_images / "benign"])
    assert len(preds) == len(list((real_or_synthetic_images / "benign").glob("*.jpg")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ev.predict(model_dir, [tmp_path / "empty"])
