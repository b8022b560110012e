"""skin/infra/artifacts.py: the bucket layout of ARCHITECTURE.md, spelled out literally here.

The literals are the on-bucket contract: a renamed constant must fail this file."""

from __future__ import annotations

import pytest

from skin.errors import DataError, DocumentError
from skin.infra import artifacts as a
from skin.infra import documents as d
from skin.infra.config import parse_experiment

ROOT = "gs://bkt/p/exp"


def test_every_path_under_the_root_is_the_documented_one():
    assert a.data_uri(ROOT) == "gs://bkt/p/exp/data"
    assert a.manifest_uri(ROOT) == "gs://bkt/p/exp/data/manifest.json"
    assert a.stage_report_uri(ROOT) == "gs://bkt/p/exp/data/stage_report.json"
    assert a.quarantine_uri(ROOT, "benign/x.jpg") == "gs://bkt/p/exp/data/quarantine/benign/x.jpg"
    assert a.oracle_uri(ROOT) == "gs://bkt/p/exp/tuner/oracle"
    assert a.lock_uri(ROOT) == "gs://bkt/p/exp/tuner/oracle/lock.json"
    assert a.result_uri(ROOT) == "gs://bkt/p/exp/tuner/result.json"
    assert a.best_uri(ROOT) == "gs://bkt/p/exp/tuner/best_hyperparameters.json"
    assert a.trials_uri(ROOT) == "gs://bkt/p/exp/trials"
    assert (a.trial_uri(a.trials_uri(ROOT), "0003", a.EPOCH_STATE, 2)
            == "gs://bkt/p/exp/trials/0003/attempt-2/epoch.json")
    assert (a.trial_uri(a.trials_uri(ROOT), "0003", a.BEST_WEIGHTS)
            == "gs://bkt/p/exp/trials/0003/checkpoint.weights.h5")
    assert a.latest_uri(ROOT) == "gs://bkt/p/exp/models/LATEST"
    assert a.model_dir_uri(ROOT, "20250101-000000") == "gs://bkt/p/exp/models/20250101-000000"
    assert a.model_file_uri(ROOT, "v") == "gs://bkt/p/exp/models/v/model.keras"
    assert a.model_file_uri(ROOT, "v", a.SERVING) == "gs://bkt/p/exp/models/v/serving.json"
    assert a.model_file_uri(ROOT, "v", a.METRICS) == "gs://bkt/p/exp/models/v/metrics.json"
    assert (a.REPORT_HTML, a.SEARCH_PNG, a.MODEL_CARD, a.SERVING_ARCHIVE_ENTRY) == (
        "report.html", "search.png", "model_card.md", "skin_serving.json")


def test_an_experiment_stands_for_its_root_and_its_folders_come_from_here():
    exp = parse_experiment({"apiVersion": "skin/v1", "kind": "Experiment", "name": "exp",
                            "storage": {"bucket": "bkt", "prefix": "p"}}, env={})
    assert exp.root_uri == ROOT
    assert a.best_uri(exp) == a.best_uri(ROOT)
    assert (exp.data_uri, exp.tuner_uri, exp.trials_uri, exp.models_uri) == (
        a.data_uri(ROOT), a.tuner_uri(ROOT), a.trials_uri(ROOT), a.models_uri(ROOT))


def test_attempt_folders_are_read_back_and_other_names_are_not_attempts():
    assert a.attempt_of(a.attempt_dir(7)) == 7
    assert a.attempt_of("attempt-") is None
    assert a.attempt_of("attempt-x") is None
    assert a.attempt_of("checkpoint.weights.h5") is None


def test_one_direction_rule_for_every_objective_an_experiment_may_name():
    import keras_tuner  # the rule agrees with keras-tuner's own inference for these names
    from keras_tuner.src.engine.metrics_tracking import infer_metric_direction

    from skin.infra.config import SearchConfig

    assert keras_tuner.__version__.startswith("1.4")
    for name in SearchConfig.__dataclass_fields__["objective"].metadata["choices"]:
        assert a.objective_direction(name) == infer_metric_direction(name)
    assert (a.objective_direction("val_loss"), a.objective_direction("val_auc")) == ("min", "max")
    assert SearchConfig(objective="val_loss").direction == "min"
    with pytest.raises(ValueError, match="'val_f1' has no known direction"):
        a.objective_direction("val_f1")


def test_a_document_states_its_direction_and_a_bad_one_is_refused():
    assert a.direction_of({"direction": "min"}, "val_auc") == "min"  # stated wins
    assert a.direction_of({"objective": "val_loss"}, "val_loss") == "min"
    assert a.direction_of(None, "val_accuracy") == "max"
    with pytest.raises(ValueError, match="'minimise' is not valid"):
        a.direction_of({"direction": "minimise"}, "val_loss")


BEST_DOC = {"trial_id": "0004", "score": 0.83, "objective": "val_auc", "direction": "max",
            "hyperparameters": {"filters": 32, "learning_rate": 0.001}, "epochs": 6,
            "best_epoch": 4}  # as the chief writes it (skin.tuning.results.build_best)


def test_the_best_trial_reads_back_what_was_written_key_for_key():
    best = d.BestTrial.from_json(BEST_DOC)
    assert (best.trial_id, best.score, best.direction, best.best_epoch) == ("0004", 0.83, "max", 4)
    assert best.to_json() == BEST_DOC and list(best.to_json()) == list(BEST_DOC)
    assert "confirmation" not in best.to_json()  # absent unless confirmation picked it
    confirmed = dict(BEST_DOC, confirmation={"chosen": "0004"})
    assert d.BestTrial.from_json(confirmed).to_json() == confirmed
    assert d.BestTrial.from_json(dict(BEST_DOC, newer_key=1)).to_json() == BEST_DOC


@pytest.mark.parametrize("doc, message", [
    ([], "expected a JSON object, got list"),
    ({k: v for k, v in BEST_DOC.items() if k != "direction"}, "'direction' is missing"),
    ({k: v for k, v in BEST_DOC.items() if k != "hyperparameters"},
     "'hyperparameters' is missing"),
    (dict(BEST_DOC, score="0.8"), "'score' is '0.8'; expected int/float"),
    (dict(BEST_DOC, epochs=True), "'epochs' is True; expected int"),
    (dict(BEST_DOC, hyperparameters=[1]), "'hyperparameters' is \\[1\\]; expected dict"),
    (dict(BEST_DOC, direction="maximise"), "'direction' is 'maximise'"),
])
def test_a_best_trial_of_another_shape_is_refused_by_name(doc, message):
    with pytest.raises(DocumentError, match=f"^gs://x/best_hyperparameters.json: {message}"):
        d.BestTrial.from_json(doc, "gs://x/best_hyperparameters.json")
    assert issubclass(DocumentError, DataError)  # exit 3: the role cannot read its input


def test_the_serving_document_round_trips_and_needs_only_a_threshold():
    doc = d.ServingDocument(0.42, 224, version="20250101-000000",
                            data_source={"kind": "synthetic"}).to_json()
    assert doc == {"threshold": 0.42, "image_size": 224, "class_names": ["benign", "malignant"],
                   "positive_class": "malignant", "version": "20250101-000000",
                   "input": "float32 RGB pixels 0..255, shape [batch, 224, 224, 3]",
                   "output": "probability of 'malignant'; predict it when >= threshold",
                   "data_source": {"kind": "synthetic"}}
    assert d.ServingDocument.from_json(doc).to_json() == doc
    assert "data_source" not in d.ServingDocument(0.5, 64).to_json()
    bare = d.ServingDocument.from_json({"threshold": 0.3})
    assert (bare.threshold, bare.image_size, bare.class_names, bare.version) == (
        0.3, 0, ("benign", "malignant"), "")


@pytest.mark.parametrize("doc, message", [
    ({"image_size": 64}, "'threshold' is missing"),
    ({"threshold": "high"}, "'threshold' is 'high'; expected int/float"),
    ({"threshold": 0.5, "image_size": "64"}, "'image_size' is '64'"),
    ({"threshold": 0.5, "class_names": ["a", "b", "c"]}, "'class_names' is .*expected two"),
])
def test_a_serving_document_of_another_shape_is_refused_by_name(doc, message):
    with pytest.raises(DocumentError, match=f"^m/serving.json: {message}"):
        d.ServingDocument.from_json(doc, "m/serving.json")


def _result_doc(**changes) -> dict:
    trial = {"id": "0001", "status": "completed", "score": 0.7, "hyperparameters": {"units": 4},
             "worker": "tuner0", "epochs": 2, "duration": 3.5, "attempts": [], "message": None,
             "continues": None, "stopped_at": None, "confirms": None, "seed": None, "fold": None}
    return {"outcome": "completed", "reason": "", "tuner": "random", "objective": "val_auc",
            "direction": "max", "started_at": 1.0, "finished_at": 2.0,
            "best": {"trial_id": "0001", "score": 0.7}, "counts": {"completed": 1},
            "trials_by_status": {"completed": ["0001"]}, "stopped_early": [],
            "confirmation": None, "attempts_by_status": {"completed": 1}, "trials": [trial],
            **changes}


def test_the_search_result_reads_back_what_was_written_key_for_key():
    doc = _result_doc()
    result = d.SearchResult.from_json(doc)
    assert (result.direction, result.trials[0].id, result.trials[0].score) == ("max", "0001", 0.7)
    assert result.to_json() == doc and list(result.to_json()) == list(doc)
    assert list(result.to_json()["trials"][0]) == list(doc["trials"][0])
    # A result from before stopped_early, confirmation and folds still reads.
    old = {k: v for k, v in doc.items() if k not in ("stopped_early", "confirmation",
                                                     "attempts_by_status")}
    old["trials"] = [{k: doc["trials"][0][k] for k in ("id", "status", "score",
                                                       "hyperparameters")}]
    assert d.SearchResult.from_json(old).trials[0].fold is None


@pytest.mark.parametrize("doc, message", [
    ({k: v for k, v in _result_doc().items() if k != "counts"}, "'counts' is missing"),
    (_result_doc(outcome="done"), "'outcome' is 'done'"),
    (_result_doc(trials={"0001": {}}), "'trials' is .*expected list"),
    (_result_doc(trials=[{"trial_id": "0001", "status": "completed", "score": 0.7,
                          "hyperparameters": {}}]), "trials\\[0\\]: 'id' is missing"),
    (_result_doc(best={"trial_id": "0001"}), "best: 'score' is missing"),
])
def test_a_search_result_of_another_shape_is_refused_by_name(doc, message):
    with pytest.raises(DocumentError, match=f"^r.json: {message}"):
        d.SearchResult.from_json(doc, "r.json")


def test_the_manifest_view_reads_data_staged_with_and_without_folds():
    doc = {"version": 1, "splits": {"train": {"count": 8, "shards": ["train-0-of-1.tfrecord"]},
                                    "validation": {"count": 2}, "test": {"count": 2}},
           "folds": 3, "fold_counts": [{"count": 2}] * 3, "synthetic": True, "extra": {}}
    manifest = d.DataManifest.from_json(doc)
    assert (manifest.folds, manifest.count("train"), manifest.count("nope")) == (3, 8, 0)
    assert manifest.to_json() is doc  # as written: its digest still checks
    before_folds = {k: v for k, v in doc.items() if k not in ("folds", "fold_counts")}
    assert d.DataManifest.from_json(before_folds).folds == 1


@pytest.mark.parametrize("doc, message", [
    ({"version": 2, "splits": {}}, "not a version 1 staging manifest"),
    ({"splits": {}}, "'version' is missing"),
    ({"version": 1, "splits": {"train": {"shards": []}}}, "splits.train: 'count' is missing"),
    ({"version": 1, "splits": {}, "folds": "3"}, "'folds' is '3'"),
])
def test_a_manifest_of_another_shape_is_refused_by_name(doc, message):
    with pytest.raises(DocumentError, match=f"^d/manifest.json: {message}"):
        d.DataManifest.from_json(doc, "d/manifest.json")
