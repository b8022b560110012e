"""Confirmation trials on other validation folds (skin.tuning.confirm): the chief's oracle in
process, the fold count read from a real stage's manifest in the storage emulator."""

from __future__ import annotations

import pytest

from skin.data.dataset import staged_folds
from skin.infra.config import parse_experiment
from skin.staging.stage import stage
from skin.tuning.confirm import FOLD_KEY, fold_of_seed

SCORES = {0.1: 0.70, 0.5: 0.90, 0.9: 0.80}  # x -> val_auc of the search's trials


def experiment(bucket: str, source, name: str = "confirm", **confirm):
    return parse_experiment({
        "apiVersion": "skin/v1", "kind": "Experiment", "name": name,
        "storage": {"bucket": bucket, "prefix": "p"},
        "data": {"source": str(source), "validation_fraction": 0.25, "test_fraction": 0.2,
                 "shards": 2, "seed": 7},
        "search": {"tuner": "random", "max_trials": 3, "max_epochs": 2,
                   "confirm": {"top": 2, "seeds": 3, **confirm}}}, env={})


@pytest.fixture(scope="module")
def staged(real_or_synthetic_images, emulator, tmp_path_factory):
    """A real stage into the emulator; train 0.55 / validation 0.25: 3 folds."""
    import uuid

    from skin.infra.storage import Storage

    bucket = f"t-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    exp = experiment(bucket, real_or_synthetic_images)
    stage(exp, Storage(), work_dir=tmp_path_factory.mktemp("work"))
    return bucket, real_or_synthetic_images


def run_search(exp, folds_source):
    """Every trial the oracle hands out, completed with a score; returns the oracle."""
    from keras_tuner.src.engine import metrics_tracking
    from prometheus_client import CollectorRegistry

    from skin.metrics.chief import ChiefMetrics
    from skin.tuning.chief import ChiefListener
    from skin.tuning.oracle import make_oracle

    oracle = make_oracle(exp)
    oracle.hyperparameters.Choice("x", sorted(SCORES))
    oracle.listener = ChiefListener(ChiefMetrics(CollectorRegistry()), 2)
    if oracle.confirm is not None:
        oracle.confirm.folds_source = folds_source
    for _ in range(50):
        a = oracle.assign("tuner0")
        t = a.trial
        if t.status != "RUNNING":
            break
        values = t.hyperparameters.values
        score = SCORES[values["x"]] - 0.01 * values.get(FOLD_KEY, 0)  # a fold is harder
        for epoch in range(2):
            oracle.report(t.trial_id, "tuner0", a.attempt, {"val_auc": score}, epoch,
                          progress_only=True)
        t.metrics = metrics_tracking.MetricsTracker()
        t.metrics.register("val_auc", direction="max")
        t.metrics.update("val_auc", score, step=1)
        t.status = "COMPLETED"
        oracle.end(t, "tuner0", a.attempt)
    assert oracle.state == "finished"
    return oracle


def confirmations(oracle):
    return sorted((str(t.hyperparameters.values["tuner/confirms"]),
                    t.hyperparameters.values["tuner/seed"],
                    t.hyperparameters.values.get(FOLD_KEY))
                   for t in oracle.trials.values()
                   if "tuner/confirms" in t.hyperparameters.values)


def test_fold_of_seed_cycles_through_the_folds_after_the_validation_split():
    assert [fold_of_seed(s, 3) for s in (1, 2, 3, 4)] == [1, 2, 1, 2]
    assert [fold_of_seed(s, 6) for s in (1, 5, 6)] == [1, 5, 1]
    assert fold_of_seed(1, 1) is None


def test_confirmation_trials_validate_on_the_staged_folds(staged, storage):
    from skin.tuning.results import build_result

    bucket, source = staged
    exp = experiment(bucket, source)
    assert staged_folds(storage, exp.data_uri) == 3
    oracle = run_search(exp, lambda: staged_folds(storage, exp.data_uri))
    made = confirmations(oracle)
    top = [t.trial_id for t in oracle.confirm.candidates(oracle)]
    # every candidate on the same folds, seed s on fold 1 + (s-1) % 2
    assert made == sorted((c, s, f) for c in top for s, f in ((1, 1), (2, 2), (3, 1)))
    summary = build_result(oracle, exp).confirmation
    assert summary["folds"] == [0, 1, 2]
    for row in summary["candidates"]:
        assert row["folds"] == [0, 1, 2, 1] and row["n"] == 4
        base = row["scores"][0]
        assert row["scores"] == pytest.approx([base, base - 0.01, base - 0.02, base - 0.01])
    assert "validated on folds 0, 1, 2" in summary["text"]
    trials = build_result(oracle, exp).to_json()["trials"]
    assert sorted(t["fold"] for t in trials if t["confirms"]) == [1, 1, 1, 1, 2, 2]
    assert all(t["fold"] is None for t in trials if not t["confirms"])


def test_without_staged_folds_or_with_folds_off_only_the_seed_varies(staged, storage):
    bucket, source = staged
    nothing = experiment(bucket, source, name="never-staged")  # no manifest: no folds
    oracle = run_search(nothing, lambda: staged_folds(storage, nothing.data_uri))
    assert [f for _, _, f in confirmations(oracle)] == [None] * 6
    off = experiment(bucket, source, folds=False)
    assert off.search.confirm.folds is False
    oracle = run_search(off, None)  # the chief gives no source when confirm.folds is off
    assert [f for _, _, f in confirmations(oracle)] == [None] * 6
    assert oracle.confirm.summary(oracle)["folds"] == [0]


def test_a_restarted_chief_keeps_the_seed_only_confirmation_it_began(staged, storage):
    bucket, source = staged
    exp = experiment(bucket, source)
    oracle = run_search(exp, None)  # began (and ended) without folds
    oracle.confirm._folds = None  # as a new chief would: decide again from the trials
    oracle.confirm.folds_source = lambda: staged_folds(storage, exp.data_uri)
    assert oracle.confirm.folds(oracle) == 1


def test_folds_on_keep_the_fingerprint_of_searches_saved_before_folds():
    from skin.tuning.fingerprint import fingerprint_matches, search_fingerprint

    doc = {"apiVersion": "skin/v1", "kind": "Experiment", "name": "confirm",
           "search": {"tuner": "random", "max_trials": 3, "max_epochs": 2,
                      "confirm": {"top": 2, "seeds": 3}}}
    on = parse_experiment(doc, env={})
    assert on.search.confirm.folds is True  # the default
    assert search_fingerprint(on) == "abc4edfafc9a2330"  # what the chief saved before folds
    doc["search"]["confirm"]["folds"] = False
    off = parse_experiment(doc, env={})
    assert not fingerprint_matches(off, search_fingerprint(on))
