"""skin.publishing.retrain: retrain → threshold on validation → evaluate → publish, against the
storage emulator with a tiny staged set of real images (32 px, 2 epochs).

One module-scoped retrain with the real SkinHyperModel feeds most assertions; a
second one, with a stand-in hypermodel and no test split, checks the fallback to
validation; a third shows that a failed upload never moves LATEST.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import uuid
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from skin.context import RoleContext
from skin.data import provenance
from skin.errors import RetryableError
from skin.infra import artifacts
from skin.infra.config import parse_experiment
from skin.infra.runtime import Runtime
from skin.infra.storage import Storage, join
from skin.publishing import model_card, publish, training
from skin.publishing import retrain as rt
from skin.serving import contract as serving
from skin.serving import evaluate as ev
from skin.serving import scoring

VERSION_FILES = {"model.keras", "serving.json", "metrics.json", "model_card.md",
                 "learning_curves.png", "roc.png", "confusion_matrix.png", "reliability.png",
                 "saved_model/saved_model.pb", "search.png", "report.html"}
SIZE = 32

# Small and fast, from the real search space.
BEST = {
    "trial_id": "0007", "score": 0.81, "objective": "val_auc", "direction": "max", "epochs": 2,
    "best_epoch": 2,
    "hyperparameters": {
        "stem": 2, "blocks": 3, "filters": 16, "kernel_size": 3, "block_type": "plain",
        "batch_norm": True,
        "pooling": "avg", "dense_units": 0, "dropout": 0.0, "optimizer": "adam",
        "learning_rate": 3e-3, "weight_decay": 0.0, "lr_schedule": "constant",
        "label_smoothing": 0.0, "augment": 0.0, "mixup": 0.0, "class_weight": False,
        "batch_size": 16, "tuner/epochs": 2,
    },
}



def _trial(tid: str, score: float, worker: str) -> dict:
    return {"id": tid, "status": "completed", "score": score, "worker": worker, "epochs": 2,
            "hyperparameters": BEST["hyperparameters"], "duration": 12.5, "message": None,
            "continues": None, "attempts": [{"n": 1, "worker": worker, "status": "completed",
                                             "reason": None, "started": 1.0e9, "ended": 1.0e9 + 12.5,
                                             "epochs": 2}]}


# tuner/result.json as skin.tuning writes it (the run report reads it).
RESULT = {
    "outcome": "completed", "reason": "", "tuner": "random", "objective": "val_auc",
    "direction": "max", "started_at": 1.0e9, "finished_at": 1.0e9 + 30,
    "best": {"trial_id": "0007", "score": 0.81}, "counts": {"completed": 2},
    "trials_by_status": {"completed": ["0001", "0007"]},
    "trials": [_trial("0001", 0.64, "tuner0"), _trial("0007", 0.81, "tuner1")],
}


def experiment(bucket: str, source: Path, *, test_fraction: float = 0.2, epochs: int = 2,
               **retrain):
    return parse_experiment({
        "apiVersion": "skin/v1", "kind": "Experiment", "name": "rt",
        "storage": {"bucket": bucket, "prefix": "it"},
        "data": {"source": str(source), "validation_fraction": 0.3,
                 "test_fraction": test_fraction, "image_size": SIZE, "seed": 3, "shards": 1},
        "search": {"tuner": "random", "max_trials": 2, "max_epochs": 3},
        "retrain": {"epochs": epochs, "patience": 1, "target_sensitivity": 0.9, **retrain},
    }, env={})


class RecordingStorage(Storage):
    """The real Storage, remembering the order in which objects were completely written;
    ``fail_on`` makes one upload fail the way a flaky network does."""

    def __init__(self, fail_on: str | None = None):
        super().__init__(tries=1)
        self.written: list[str] = []
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def _record(self, uri):
        with self._lock:
            self.written.append(str(uri))

    def upload_file(self, local_path, uri):
        if self.fail_on and str(uri).endswith(self.fail_on):
            raise RetryableError(f"{uri}: injected upload failure")
        super().upload_file(local_path, uri)
        self._record(uri)

    def write_bytes(self, uri, data, **kwargs):
        generation = super().write_bytes(uri, data, **kwargs)
        self._record(uri)
        return generation


def stage(exp, storage):
    from skin.staging.stage import stage as run_stage

    run_stage(exp, storage)


@pytest.fixture(scope="module")
def run(emulator, real_or_synthetic_images, tmp_path_factory):
    """Stage the small real set (with a test split) and retrain once."""
    bucket = f"rt-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    exp = experiment(bucket, real_or_synthetic_images)
    storage = RecordingStorage()
    stage(exp, storage)
    storage.write_json(join(exp.tuner_uri, "result.json"), RESULT)
    storage.written.clear()
    runtime = Runtime(work_dir=tmp_path_factory.mktemp("work"))
    published = rt.retrain(RoleContext(exp, runtime, storage), best=BEST)
    return exp, runtime, storage, published


@pytest.mark.slow
def test_published_layout_in_the_bucket_and_locally(run):
    exp, _, storage, published = run
    assert re.fullmatch(r"\d{8}-\d{6}", published.version)
    assert published.uri == join(exp.models_uri, published.version)
    in_bucket = {u[len(published.uri) + 1:] for u in storage.list(published.uri)}
    assert VERSION_FILES <= in_bucket
    assert any(name.startswith("saved_model/variables/") for name in in_bucket)
    local = {p.relative_to(published.local_dir).as_posix()
             for p in published.local_dir.rglob("*") if p.is_file()}
    assert local == in_bucket
    assert published.local_dir == run[1].work_dir / "published" / published.version
    assert storage.read_text(join(exp.models_uri, "LATEST")).strip() == published.version
    for png in ("learning_curves.png", "roc.png", "confusion_matrix.png", "reliability.png"):
        assert (published.local_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_latest_is_written_last(run):
    exp, _, storage, published = run
    latest = join(exp.models_uri, "LATEST")
    assert storage.written[-1] == latest
    assert storage.written.count(latest) == 1
    assert {u[len(published.uri) + 1:] for u in storage.written[:-1]} >= VERSION_FILES


@pytest.mark.slow
def test_metrics_json(run):
    exp, runtime, storage, published = run
    metrics = storage.read_json(join(published.uri, "metrics.json"))
    assert metrics == json.loads(json.dumps(published.metrics))
    manifest = json.loads((runtime.work_dir / "data" / "manifest.json").read_text())
    assert metrics["evaluated_on"] == "test"
    assert metrics["n"] == manifest["splits"]["test"]["count"]
    assert metrics["validation"]["n"] == manifest["splits"]["validation"]["count"]
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, key
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    assert tn + fp + fn + tp == metrics["n"]
    assert (tp + fn, tn + fp) == (metrics["n_malignant"], metrics["n_benign"])
    assert metrics["accuracy"] == pytest.approx((tn + tp) / metrics["n"])
    assert metrics["validation"]["sensitivity"] >= 0.9  # the threshold's promise
    assert metrics["threshold"] == metrics["serving"]["threshold"] == metrics["validation"][
        "threshold"]
    assert (metrics["image_size"], metrics["class_names"]) == (SIZE, ["benign", "malignant"])
    retrained = metrics["training"]
    assert 1 <= retrained["epochs_trained"] <= 2 and retrained["epochs_budget"] == 2
    assert len(retrained["history"]["loss"]) == len(retrained["history"]["val_loss"]) == \
        retrained["epochs_trained"]
    assert retrained["monitor"] == "val_auc" and retrained["best_epoch"] >= 1
    assert metrics["hyperparameters"] == BEST["hyperparameters"]
    assert metrics["tta"] == {"enabled": False, "views": 1}  # the defaults: one plain model
    assert (metrics["ensemble"]["size"], metrics["ensemble"]["members"][0]["trial_id"]) == (1, "0007")
    assert metrics["data"]["manifest_sha256"]
    assert metrics["code_version"].startswith("0.")


@pytest.mark.slow
def test_threshold_comes_from_validation_and_test_metrics_from_the_saved_model(run):
    exp, runtime, _, published = run
    model, info = serving.load_published(published.local_dir)
    data_dir = runtime.work_dir / "data"
    val_labels, val_probs = training.split_predictions(model, data_dir, "validation", SIZE)
    assert info.threshold == pytest.approx(scoring.choose_threshold(val_labels, val_probs, 0.9),
                                           abs=1e-6)
    test_labels, test_probs = training.split_predictions(model, data_dir, "test", SIZE)
    expected = scoring.classification_metrics(test_labels, test_probs, info.threshold)
    assert published.metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert published.metrics["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)


@pytest.mark.slow
def test_model_keras_is_self_describing_and_loads_in_safe_mode(run):
    import keras

    published = run[3]
    keras_file = published.local_dir / "model.keras"
    keras.models.load_model(keras_file, safe_mode=True)
    with zipfile.ZipFile(keras_file) as zf:
        inside = json.loads(zf.read(artifacts.SERVING_ARCHIVE_ENTRY))
    beside = json.loads((published.local_dir / "serving.json").read_text())
    assert inside == beside
    assert beside["threshold"] == published.metrics["threshold"]
    assert beside["data_source"]["kind"] == "folder"  # the staged source's kind
    assert serving.load_published(published.local_dir)[1].data_source_kind == "folder"
    assert (beside["image_size"], beside["class_names"], beside["version"]) == (
        SIZE, ["benign", "malignant"], published.version)


@pytest.mark.slow
def test_saved_model_export_matches_keras(run):
    import tensorflow as tf

    published = run[3]
    model, _ = serving.load_published(published.local_dir)
    x = np.random.default_rng(0).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    exported = tf.saved_model.load(str(published.local_dir / "saved_model"))
    np.testing.assert_allclose(np.asarray(exported.serve(x)), model.predict_on_batch(x),
                               atol=1e-5)


@pytest.mark.slow
def test_model_card(run):
    exp, _, _, published = run
    card = (published.local_dir / "model_card.md").read_text()
    m = published.metrics
    for needle in (m["data"]["manifest_sha256"], m["code_version"],
                   "Not a medical device", "block_type",
                   f"{m['threshold']:.4f}", "apiVersion: skin/v1",
                   "Evaluated on the **test** split",
                   # A folder of images without a README or data.licence: the licence is not
                   # guessed, and the folder's path is named.
                   "- source: a local folder, `" + exp.data.source + "`",
                   "licence of these images is not known", "`data.licence`",
                   "## At a clinic's prevalence", "## Operating points", "## Calibration",
                   "DeLong", "Wilson", "10 equal-width bins", "Mitra"):
        assert needle in card, needle
    assert "ISIC" not in card and "CC-BY-NC" not in card
    assert "Ensemble and test-time augmentation" not in card
    lo, hi = m["intervals_95"]["sensitivity"]
    assert lo <= m["sensitivity"] <= hi
    assert (f"| Sensitivity (malignant recall) | {m['sensitivity']:.3f} | {lo:.3f} – {hi:.3f} "
            "(Wilson) |") in card
    lo, hi = m["intervals_95"]["roc_auc"]
    assert f"| ROC AUC | {m['roc_auc']:.3f} | {lo:.3f} – {hi:.3f} (DeLong) |" in card
    pv = m["at_prevalence"]
    assert pv["prevalence"] == 0.062 and f"**{pv['ppv']:.3f}**" in card
    assert m["reference_prevalence"]["source"].startswith("urgent suspected skin cancer")
    for row in m["operating_points"]:
        assert f"| {row['target_sensitivity']:.2f}" in card and f"{row['threshold']:.4f}" in card
    retrained = m["training"]
    assert retrained["restored_best"] is True  # the default
    assert retrained["published_epoch"] == retrained["best_epoch"]
    assert f"restored epoch {retrained['best_epoch']} (best val_auc)" in card


@pytest.mark.slow
def test_card_names_the_isic_licence_only_for_the_isic_images(run, tmp_path):
    """The same published metrics, carded for three sources: the ISIC folder (recognised by
    the dataset's README next to it, or by data.licence: isic), synthetic images and
    another folder."""
    from skin.data import provenance

    exp, _, _, published = run
    isic = tmp_path / "skin-cancer-isic"
    (isic / "train").mkdir(parents=True)
    readme = Path(__file__).resolve().parents[2] / "shared/datasets/skin-cancer-isic/README.md"
    (isic / "README.md").write_text(readme.read_text() if readme.is_file() else
                                    "# Skin Cancer (ISIC Archive)\nImages from the ISIC Archive.")
    cases = {
        "isic-readme": provenance.describe(str(isic / "train"), isic / "train"),
        "isic-config": provenance.describe(str(tmp_path / "elsewhere"), tmp_path,
                                           licence="isic"),
        "synthetic": provenance.describe("synthetic", synthetic=True),
        "other": provenance.describe(str(tmp_path / "mine"), tmp_path / "mine"),
        "own-text": provenance.describe(str(tmp_path / "mine"), licence="CC-BY 4.0, ours"),
    }
    cards = {}
    for name, doc in cases.items():
        metrics = json.loads(json.dumps(published.metrics))
        metrics["data"]["provenance"] = doc
        cards[name] = model_card.model_card(exp, published.version, metrics, BEST, {})
    for name in ("isic-readme", "isic-config"):
        assert "ISIC Archive" in cards[name] and "CC-BY-NC" in cards[name], name
    assert f"recognised by {isic / 'README.md'}" in cards["isic-readme"]
    for name in ("synthetic", "other", "own-text"):
        assert "ISIC" not in cards[name] and "CC-BY-NC" not in cards[name], name
    assert "SYNTHETIC images" in cards["synthetic"]
    assert "CC-BY 4.0, ours" in cards["own-text"]


@pytest.mark.slow
def test_run_report_shows_the_model_then_the_search(run):
    published = run[3]
    page = (published.local_dir / "report.html").read_text()
    m = published.metrics
    assert page.index("Published model") < page.index("The search")
    for heading in ("ROC", "Confusion matrix", "Calibration", "Operating points", "Training"):
        assert f"<h2>{heading}</h2>" in page, heading
    lo, hi = m["intervals_95"]["roc_auc"]
    assert f"{m['roc_auc']:.3f}" in page and f"{lo:.3f} – {hi:.3f} (DeLong)" in page
    assert page.count("data:image/png;base64,") == 5  # roc, cm, reliability, curves, search
    assert not re.search(r'(src|href)="(?!data:)', page)
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    assert f"{tp} ({tp / (tp + fn):.3f} sensitivity)" in page
    assert "0007" in page  # the search's best trial


@pytest.mark.slow
@pytest.mark.parametrize("restore_best", [True, False])
def test_restore_best_publishes_the_best_or_the_last_epochs_weights(run, restore_best):
    """Three real epochs on the staged set; validation AUC is made to peak at epoch 1, so
    the best and the last epoch differ, and the returned weights are compared with
    snapshots taken at the end of each epoch."""
    import keras

    from skin.model.hypermodel import SkinHyperModel

    exp, runtime = run[0], run[1]
    exp = replace(exp, retrain=replace(exp.retrain, epochs=3, patience=0,
                                       restore_best=restore_best))
    snapshots: list[list[np.ndarray]] = []

    class PeakAtEpochOne(keras.callbacks.Callback):
        # Runs before the early stopper and rewrites the epoch's val_auc in place.
        def on_epoch_end(self, epoch, logs=None):
            logs["val_auc"] = 0.9 - 0.1 * epoch
            snapshots.append([w.copy() for w in self.model.get_weights()])

    class Rigged(SkinHyperModel):
        def fit(self, hp, model, *, callbacks=None, **kw):
            return super().fit(hp, model, callbacks=[PeakAtEpochOne(), *(callbacks or [])], **kw)

    model, trained = training.train(exp, Rigged(exp), BEST, runtime.work_dir / "data")
    assert (trained["epochs_trained"], trained["best_epoch"]) == (3, 1)
    assert trained["restored_best"] is restore_best
    assert trained["published_epoch"] == (1 if restore_best else 3)
    expected = snapshots[trained["published_epoch"] - 1]
    other = snapshots[2 if restore_best else 0]
    got = model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert not all(np.array_equal(a, b) for a, b in zip(got, other))
    card_words = model_card._published_epoch(trained)
    assert card_words == ("restored epoch 1 (best val_auc)" if restore_best else
                          "published the last epoch's weights (epoch 3; the best val_auc was "
                          "at epoch 1)")


@pytest.mark.slow
def test_evaluate_and_predict_the_published_model_from_the_bucket(run, real_or_synthetic_images,
                                                                  tmp_path):
    exp, _, storage, published = run
    result = ev.evaluate(exp.models_uri, real_or_synthetic_images, tmp_path / "eval.json",
                         storage=storage)
    n_images = len(list(real_or_synthetic_images.rglob("*.jpg")))
    assert result["n"] == n_images and result["n_skipped"] == 0
    assert result["version"] == published.version
    assert result["threshold"] == pytest.approx(published.metrics["threshold"])
    assert sum(map(sum, result["confusion_matrix"])) == n_images
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["roc_auc"] <= 1.0
    # Most of these images trained the model: it must rank them better than chance.
    assert result["roc_auc"] > 0.5
    images = sorted(real_or_synthetic_images.rglob("*.jpg"))[:4]
    lines = ev.format_predictions(ev.predict(f"{exp.models_uri}/LATEST", images,
                                             storage=storage)).splitlines()
    assert lines[0].split("\t") == list(ev.PREDICTION_FIELDS) and len(lines) == 5
    assert all(line.startswith(str(p)) and re.search(r"\t[01]\.\d{6}\t(benign|malignant)\t",
                                                     line) and published.version in line
               for p, line in zip(images, lines[1:]))


# ---------------------------------------------------------------------------
# Without a test split, with a stand-in hypermodel


def _stand_in_hypermodel():
    """A minimal hypermodel with SkinHyperModel's interface (float 0..255 in, P(malignant) out)."""
    import keras
    import keras_tuner

    from skin.data import dataset as skin_data

    class TinyHyperModel(keras_tuner.HyperModel):
        built: list = []  # every model build() made, in order (per instance once assigned)

        def build(self, hp):
            units = hp.Choice("units", [4, 8])
            inputs = keras.Input((SIZE, SIZE, 3))
            x = keras.layers.Rescaling(1 / 255.0)(inputs)
            x = keras.layers.Conv2D(units, 3, strides=2, activation="relu")(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            out = keras.layers.Dense(1, activation="sigmoid")(x)
            model = keras.Model(inputs, out)
            model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                          metrics=[keras.metrics.AUC(name="auc"),
                                   keras.metrics.BinaryAccuracy(name="accuracy")])
            self.built = [*self.built, model]
            return model

        def fit(self, hp, model, *, data_dir, epochs, callbacks=None, **kw):
            self.seen_units = hp.get("units")
            train = skin_data.dataset(data_dir, "train", SIZE, 16, training=True)
            val = skin_data.dataset(data_dir, "validation", SIZE, 16, training=False)
            return model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks,
                             verbose=0)

    return TinyHyperModel()


@pytest.mark.slow
def test_without_test_split_evaluates_on_validation(emulator, storage, bucket,
                                                    real_or_synthetic_images, tmp_path):
    exp = experiment(bucket, real_or_synthetic_images, test_fraction=0.0, epochs=0)
    stage(exp, storage)
    hypermodel = _stand_in_hypermodel()
    best = {"trial_id": "x", "score": 0.7, "objective": "val_auc", "epochs": 1,
            "hyperparameters": {"units": 8}}
    published = rt.retrain(RoleContext.with_hypermodel(exp, Runtime(work_dir=tmp_path), storage,
                                                       hypermodel), best=best)
    assert hypermodel.seen_units == 8  # the best value, not the default
    m = published.metrics
    assert m["evaluated_on"] == "validation"
    assert m["training"]["epochs_budget"] == 1  # retrain.epochs 0: the best trial's epochs
    assert {k: m[k] for k in ("n", "confusion_matrix", "accuracy", "threshold")} == {
        k: m["validation"][k] for k in ("n", "confusion_matrix", "accuracy", "threshold")}
    assert "optimistic" in (published.local_dir / "model_card.md").read_text()
    assert storage.read_text(join(exp.models_uri, "LATEST")).strip() == published.version


@pytest.mark.slow
def test_a_failed_upload_never_moves_latest(emulator, bucket, real_or_synthetic_images,
                                            tmp_path):
    exp = experiment(bucket, real_or_synthetic_images, test_fraction=0.0, epochs=1)
    storage = RecordingStorage()
    stage(exp, storage)
    storage.write_text(join(exp.models_uri, "LATEST"), "20000101-000000\n")  # an older model
    failing = RecordingStorage(fail_on="saved_model/saved_model.pb")
    with pytest.raises(RetryableError, match="injected"):
        rt.retrain(RoleContext.with_hypermodel(exp, Runtime(work_dir=tmp_path), failing,
                                               _stand_in_hypermodel()),
                   best={"trial_id": "x", "epochs": 1, "hyperparameters": {"units": 4}})
    assert storage.read_text(join(exp.models_uri, "LATEST")).strip() == "20000101-000000"
    assert join(exp.models_uri, "LATEST") not in failing.written


# ---------------------------------------------------------------------------
# Small parts


@pytest.mark.parametrize("retrain_epochs, best, expected", [
    (5, {"epochs": 9}, 5),                                   # the experiment says
    (0, {"epochs": 9}, 9),                                   # the best trial's epochs
    (0, {"hyperparameters": {"tuner/epochs": 4}}, 4),        # Hyperband's record of them
    (0, {}, 3),                                              # search.max_epochs
])
def test_epoch_policy(retrain_epochs, best, expected, tmp_path):
    exp = experiment("b-b", tmp_path, epochs=retrain_epochs)
    assert training._epochs(exp, best) == expected


def test_best_values_reach_the_real_hypermodel(tmp_path):
    from skin.model.hypermodel import SkinHyperModel
    from skin.model.space import hyperparameters_from_values

    exp = experiment("b-b", tmp_path)
    recorded = {**BEST["hyperparameters"], "stem": 4}   # every value off its default reaches
    values = SkinHyperModel(exp).values(hyperparameters_from_values(recorded))
    assert {k: values[k] for k in values} == {k: v for k, v in recorded.items()
                                              if not k.startswith("tuner/")}


def test_a_best_trial_recorded_before_a_new_hyperparameter_gets_its_default(tmp_path):
    # A search finished before `stem` existed: its best trial does not name it.
    from skin.model.hypermodel import SkinHyperModel
    from skin.model.space import hyperparameters_from_values

    exp = experiment("b-b", tmp_path)
    old = {k: v for k, v in BEST["hyperparameters"].items() if k != "stem"}
    values = SkinHyperModel(exp).values(hyperparameters_from_values(old))
    assert values["stem"] == 2
    assert {k: values[k] for k in old if not k.startswith("tuner/")} == {
        k: v for k, v in old.items() if not k.startswith("tuner/")}


def test_new_version_skips_a_taken_second(storage, bucket):
    models = f"gs://{bucket}/x/models"
    taken = publish.new_version(storage, models)
    storage.write_text(f"{models}/{taken}/metrics.json", "{}")
    assert publish.new_version(storage, models) > taken


@pytest.mark.slow
def test_plots_with_a_read_only_matplotlib_config_dir(tmp_path):
    code = (
        "import os, sys; from pathlib import Path; from skin.publishing import plots\n"
        "plots.plot_confusion_matrix([[3, 1], [2, 4]], 'test', 0.42, Path(sys.argv[1]))\n"
        "print(os.environ['MPLCONFIGDIR'])\n")
    out = tmp_path / "cm.png"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                          env={"MPLCONFIGDIR": "/proc/skin-no-such-dir", "HOME": "/proc",
                               "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() != "/proc/skin-no-such-dir"
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_code_version_names_the_commit():
    version = provenance.code_version()
    assert version.startswith("0.")
    if (Path(provenance.__file__).parents[2] / ".git").exists():
        assert re.search(r"\+git\.[0-9a-f]{12}", version)


def test_run_report_is_rendered_from_the_search_result(tmp_path):
    publish.render_report(_as_written(RESULT), tmp_path)
    assert (tmp_path / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert "0007" in (tmp_path / "report.html").read_text()


# ---------------------------------------------------------------------------
# Ensemble of the top trials, test-time augmentation


def _as_written(doc: dict):
    """``doc`` completed into the result.json the chief writes, read as every reader reads it."""
    from skin.infra.documents import SearchResult

    return SearchResult.from_json({"outcome": "completed", "reason": "", "tuner": "random",
                                   "best": None, "counts": {}, "trials_by_status": {}, **doc})


def _scored(tid, score, units, status="completed", **extra):
    return {"id": tid, "status": status, "score": score, "epochs": 1,
            "hyperparameters": {"units": units, **extra}}


@pytest.mark.parametrize("direction, expected", [
    ("max", ["0005", "0002", "0003"]),
    ("min", ["0004", "0007", "0003"]),  # configuration 1 at its best: 0007
])
def test_top_trials_are_distinct_and_in_objective_order(direction, expected):
    result = {"objective": "val_auc", "direction": direction, "trials": [
        _scored("0001", 0.60, 1),
        _scored("0002", 0.80, 2),
        _scored("0003", 0.70, 3),
        _scored("0004", 0.50, 4),
        _scored("0005", 0.90, 5),
        _scored("0006", 0.85, 5, **{"tuner/epochs": 9}),    # 0005's configuration, continued
        _scored("0007", 0.55, 1, **{"tuner/trial_id": "1"}),  # 0001's, continued
        _scored("0008", 0.99, 8, status="failed"),
        _scored("0009", None, 9),
        _scored("0010", 0.40, 4, status="cancelled"),
    ]}
    result = _as_written(result)
    top = training.top_trials(result, 3)
    assert [t["trial_id"] for t in top] == expected
    assert top[0] == {"trial_id": expected[0], "score": {"max": 0.90, "min": 0.50}[direction],
                      "objective": "val_auc", "epochs": 1,
                      "hyperparameters": {"units": {"max": 5, "min": 4}[direction]}}
    everything = training.top_trials(result, 8)
    assert len(everything) == 5  # five distinct configurations completed
    assert len({json.dumps(t["hyperparameters"]) for t in everything}) == 5
    # The best trial of best_hyperparameters.json comes first; its configuration only once.
    best = {"trial_id": "0003", "score": 0.7, "hyperparameters": {"units": 3}}
    assert [t["trial_id"] for t in training.top_trials(result, 3, best=best)] == [
        "0003", *[t for t in expected if t != "0003"][:2]]


def test_top_trials_direction_from_the_objective_and_without_a_result():
    result = {"objective": "val_loss", "direction": "min",
              "trials": [_scored("1", 0.3, 1), _scored("2", 0.2, 2)]}
    assert [t["trial_id"] for t in training.top_trials(_as_written(result), 2)] == ["2", "1"]
    assert [t["trial_id"] for t in training.top_trials(None, 2, objective="val_loss")] == []
    assert training.top_trials(None, 3, best={"trial_id": "x"}) == [{"trial_id": "x"}]
    assert training.top_trials(None, 3) == []


@pytest.fixture(scope="module")
def ensemble_run(emulator, real_or_synthetic_images, tmp_path_factory):
    """A retrain with retrain.ensemble 3 (the search has 2 distinct configurations) and TTA,
    with the stand-in hypermodel; no test split."""
    bucket = f"rte-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    exp = experiment(bucket, real_or_synthetic_images, test_fraction=0.0, epochs=1,
                     ensemble=3, tta=True)
    storage = RecordingStorage()
    stage(exp, storage)
    result = {**RESULT, "trials": [_scored("0001", 0.64, 4), _scored("0002", 0.81, 8),
                                   _scored("0003", 0.70, 8, **{"tuner/epochs": 1}),
                                   _scored("0004", 0.95, 4, status="failed")]}
    storage.write_json(join(exp.tuner_uri, "result.json"), result)
    storage.written.clear()
    hypermodel = _stand_in_hypermodel()
    best = {"trial_id": "0002", "score": 0.81, "objective": "val_auc", "epochs": 1,
            "hyperparameters": {"units": 8}}
    published = rt.retrain(RoleContext.with_hypermodel(
        exp, Runtime(work_dir=tmp_path_factory.mktemp("work")), storage, hypermodel), best=best)
    return exp, storage, published, hypermodel


def _views(x):
    return [np.ascontiguousarray(np.rot90(v, k, axes=(1, 2))) for v in (x, x[:, :, ::-1])
            for k in range(4)]


@pytest.mark.slow
def test_ensemble_publishes_one_model_the_mean_of_its_members(ensemble_run):
    import keras

    exp, storage, published, hypermodel = ensemble_run
    members = hypermodel.built[1:]  # the first build probed the search space (check_members)
    assert [m.get_layer(index=2).filters for m in members] == [8, 4]  # best first, then 0001
    model = keras.models.load_model(published.local_dir / "model.keras", safe_mode=True,
                                    compile=False)
    x = np.random.default_rng(1).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
    per_member = [np.mean([m.predict_on_batch(v) for v in _views(x)], axis=0) for m in members]
    assert np.abs(per_member[0] - per_member[1]).max() > 1e-4
    np.testing.assert_allclose(model.predict_on_batch(x), np.mean(per_member, axis=0),
                               rtol=1e-5, atol=1e-6)
    # the SavedModel serves the same ensemble
    import tensorflow as tf

    exported = tf.saved_model.load(str(published.local_dir / "saved_model"))
    np.testing.assert_allclose(np.asarray(exported.serve(x)), model.predict_on_batch(x),
                               atol=1e-5)


@pytest.mark.slow
def test_ensemble_threshold_and_metrics_from_the_published_model(ensemble_run, tmp_path):
    exp, storage, published, hypermodel = ensemble_run
    m = published.metrics
    assert storage.read_json(join(published.uri, "metrics.json")) == json.loads(json.dumps(m))
    assert m["tta"] == {"enabled": True, "views": 8}
    ens = m["ensemble"]
    assert (ens["requested"], ens["size"]) == (3, 2)
    assert [(e["trial_id"], e["hyperparameters"]) for e in ens["members"]] == [
        ("0002", {"units": 8}), ("0001", {"units": 4})]
    for e in ens["members"]:
        assert 0.0 <= e["validation_auc"] <= 1.0 and 0.0 <= e["validation_auc_tta"] <= 1.0
        assert e["training"]["epochs_budget"] == 1
    assert ens["validation_auc"] == m["validation"]["roc_auc"]
    # The threshold is chosen on the published (ensemble + TTA) model's own validation outputs.
    model, info = serving.load_published(published.local_dir)
    data_dir = published.local_dir.parents[1] / "data"
    labels, probs = training.split_predictions(model, data_dir, "validation", SIZE)
    assert info.threshold == pytest.approx(scoring.choose_threshold(labels, probs, 0.9), abs=1e-6)
    assert m["validation"]["roc_auc"] == pytest.approx(scoring.roc_auc(labels, probs), abs=1e-6)
    # Each member's own figure is what it scores alone.
    member_labels, member_probs = training.split_predictions(hypermodel.built[2], data_dir,  # [0]: probe
                                                       "validation", SIZE)
    assert ens["members"][1]["validation_auc"] == pytest.approx(
        scoring.roc_auc(member_labels, member_probs), abs=1e-6)


@pytest.mark.slow
def test_ensemble_is_listed_in_the_card_and_report_and_latest_moves_last(ensemble_run):
    exp, storage, published, _ = ensemble_run
    card = (published.local_dir / "model_card.md").read_text()
    assert "## Ensemble and test-time augmentation" in card
    assert "mean of 2 models" in card and "8 views" in card
    assert "| 0 | `0002` |" in card and "| 1 | `0001` |" in card
    report = (published.local_dir / "report.html").read_text()
    assert f"Published model {published.version}" in report
    assert "the mean of 2 retrained trials, averaged over 8 views" in report
    latest = join(exp.models_uri, "LATEST")
    assert storage.written[-1] == latest and storage.written.count(latest) == 1
    assert storage.read_text(latest).strip() == published.version


@pytest.mark.slow  # the run fixture retrains
def test_card_gives_the_confirmation_over_seeds_and_validation_folds(run):
    exp, _, _, published = run
    confirmation = {"folds": [0, 1, 2], "text": "trial 01 chosen over trial 00 by 0.0100 ± "
                    "0.0050 (mean of 3 and 3 trainings, validated on folds 0, 1, 2): within noise",
                    "candidates": [{"trial_id": "01", "mean": 0.91, "std": 0.01, "n": 3},
                                   {"trial_id": "00", "mean": 0.90, "std": 0.01, "n": 3}]}
    card = model_card.model_card(exp, published.version, published.metrics,
                         {**BEST, "confirmation": confirmation}, {})
    assert "validated on folds 0, 1, 2): within noise; mean ± std over seeds and validation " \
        "folds: trial 01 0.9100 ± 0.0100 (n=3)" in card
    seeds_only = {**confirmation, "folds": [0]}
    card = model_card.model_card(exp, published.version, published.metrics,
                         {**BEST, "confirmation": seeds_only}, {})
    assert "mean ± std over seeds: trial 01" in card
