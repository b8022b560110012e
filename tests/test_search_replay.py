"""The median stopping rule, and the replay benchmark (bench.search_replay) driving the
product's oracle, stopping and confirmation code over recorded learning curves."""

from __future__ import annotations

import keras_tuner
import pytest

from bench import search_replay
from skin.tuning.stopping import MedianStopping

MAX = keras_tuner.Objective("val_auc", "max")
MIN = keras_tuner.Objective("val_loss", "min")


@pytest.mark.parametrize("objective,curve,completed,stop", [
    # Katib's rule: best by epoch e strictly worse than the median of the running averages.
    (MAX, [0.5, 0.5], [[0.6, 0.8], [0.7, 0.9], [0.4, 0.5]], {"epoch": 2, "best": 0.5,
                                                             "median": 0.7}),
    (MAX, [0.5, 0.71], [[0.6, 0.8], [0.7, 0.9], [0.4, 0.5]], None),  # best beats the median
    (MAX, [0.5, 0.7], [[0.6, 0.8], [0.7, 0.9], [0.4, 0.5]], None),  # equal: not strictly worse
    (MAX, [0.5], [[0.6, 0.8], [0.7, 0.9], [0.4, 0.5]], None),  # before start_epoch
    (MAX, [0.5, 0.5], [[0.6, 0.8], [0.7, 0.9]], None),  # fewer than min_trials completed
    (MAX, [0.5, 0.5], [[0.6, 0.8], [0.7, 0.9], [0.9]], None),  # a short curve does not count
    (MIN, [0.9, 0.8], [[0.7, 0.5], [0.6, 0.4], [0.5, 0.3]], {"epoch": 2, "best": 0.8,
                                                             "median": 0.5}),
    (MIN, [0.9, 0.4], [[0.7, 0.5], [0.6, 0.4], [0.5, 0.3]], None),
])
def test_the_median_rule(objective, curve, completed, stop):
    rule = MedianStopping(objective, start_epoch=2, min_trials=3)
    got = rule.decide(curve, completed)
    if stop is None:
        assert got is None
    else:
        assert got == pytest.approx(stop)


def _doc(good=4, bad=4, epochs=6):
    """A hand-made curve table: good configurations learn, bad ones stay at 0.5 (the test's
    own fixture, not a recording)."""
    configs = []
    for i in range(good):
        top = 0.80 + 0.01 * i
        configs.append({"id": f"g{i}", "hyperparameters": {}, "seeds": {
            1: [0.55 + (top - 0.55) * (e + 1) / epochs for e in range(epochs)],
            2: [0.54 + (top - 0.56) * (e + 1) / epochs for e in range(epochs)]}})
    for i in range(bad):
        configs.append({"id": f"b{i}", "hyperparameters": {},
                        "seeds": {1: [0.5] * epochs}})
    return {"objective": "val_auc", "direction": "max", "max_epochs": epochs,
            "configs": configs}


def test_the_replay_stops_bad_configurations_with_the_products_rule():
    doc = _doc()
    report = search_replay.replay(doc, strategies=("random", "random+median"), repeats=6,
                                  max_trials=8, start_epoch=2, min_trials=2)
    rnd, med = report["strategies"]["random"], report["strategies"]["random+median"]
    assert rnd["stopped_mean"] == 0 and rnd["trials_mean"] == 8
    assert med["stopped_mean"] >= 1
    assert med["epochs_mean"] < rnd["epochs_mean"]
    assert med["regret_mean"] <= rnd["regret_mean"] + 1e-9  # bad ones never win anyway


def test_the_replay_follows_the_product_stopping_rule(monkeypatch):
    """Break the product's rule and the replay sees it: it drives the chief's code."""
    monkeypatch.setattr(MedianStopping, "decide", lambda self, curve, completed: None)
    report = search_replay.replay(_doc(), strategies=("random+median",), repeats=3,
                                  max_trials=8, start_epoch=2, min_trials=2)
    assert report["strategies"]["random+median"]["stopped_mean"] == 0


def test_the_replay_confirms_with_the_products_confirmation():
    doc = _doc(good=15, bad=15, epochs=9)  # enough configurations for Hyperband's brackets
    report = search_replay.replay(doc, strategies=("hyperband", "hyperband+confirm"),
                                  repeats=4, factor=3, top=2, seeds=2)
    hb, conf = report["strategies"]["hyperband"], report["strategies"]["hyperband+confirm"]
    assert conf["trials_mean"] == pytest.approx(hb["trials_mean"] + 4)  # 2 candidates x 2 seeds
    assert conf["epochs_mean"] == pytest.approx(hb["epochs_mean"] + 4 * 9)


def test_pick_agreement_counts_groups_of_three_with_two_alike():
    assert search_replay.agreement(["a", "b", "a", "c", "d", "e"]) == 0.5
    assert search_replay.agreement(["a", "a", "a"]) == 1.0
    assert search_replay.agreement(["a", "b"]) == 0.0  # no whole group


def test_one_oracle_seed_and_little_noise_publish_the_same_configuration():
    # 3 of 12 configurations tried, no noise: one seed samples the same 3, so the same pick;
    # a triple drawing other configurations would disagree now and then.
    doc = _doc(good=12, bad=0, epochs=4)
    quiet = dict(doc, configs=[dict(c, seeds={1: c["seeds"][1]}) for c in doc["configs"]])
    report = search_replay.replay(quiet, strategies=("random",), repeats=2, max_trials=3,
                                  triples=4)
    assert report["strategies"]["random"]["same_pick_2_of_3"] == 1.0
    assert "| 100% |" in search_replay.table(report)


def test_the_recorded_smoke_curves_replay():
    path = search_replay.SMOKE_CURVES
    doc = search_replay.load_curves(path)
    assert doc["kind"] == "smoke"
    assert len(doc["configs"]) >= 6
    assert sum(1 for c in doc["configs"] if len(c["seeds"]) == 2) >= 3
    for c in doc["configs"]:
        assert all(len(curve) == doc["max_epochs"] for curve in c["seeds"].values())
    report = search_replay.replay(doc, repeats=3)
    assert set(report["strategies"]) == set(search_replay.STRATEGIES)
    for s in report["strategies"].values():
        assert s["epochs_mean"] > 0 and s["regret_mean"] >= 0
    assert "| random+median |" in search_replay.table(report)


def test_a_stopped_trial_is_completed_with_its_partial_score_and_counted():
    from keras_tuner.src.engine import metrics_tracking
    from prometheus_client import CollectorRegistry

    from skin.infra.config import parse_experiment
    from skin.metrics.chief import ChiefMetrics
    from skin.tuning.chief import ChiefListener
    from skin.tuning.oracle import make_oracle
    from skin.tuning.results import build_result

    exp = parse_experiment({"apiVersion": "skin/v1", "kind": "Experiment", "search": {
        "tuner": "random", "max_trials": 2, "max_epochs": 3,
        "early_stopping": {"rule": "median", "start_epoch": 1, "min_trials": 1}}}, env={})
    oracle = make_oracle(exp)
    oracle.hyperparameters.Float("x", 0.0, 1.0)
    registry = CollectorRegistry()
    oracle.listener = ChiefListener(ChiefMetrics(registry), 3)

    def run(worker, curve, stop_at=None):
        a = oracle.assign(worker)
        t, seen = a.trial, []
        for e, v in enumerate(curve):
            seen.append(v)
            reply = oracle.report(t.trial_id, worker, a.attempt, {"val_auc": v}, e,
                                  progress_only=True)
            if reply.status == "STOPPED":
                assert e + 1 == stop_at
                break
        else:
            assert stop_at is None
        t.metrics = metrics_tracking.MetricsTracker()
        t.metrics.register("val_auc", direction="max")
        t.metrics.update("val_auc", max(seen), step=seen.index(max(seen)))
        t.status = "COMPLETED"
        oracle.end(t, worker, a.attempt)
        return t.trial_id

    good = run("tuner0", [0.8, 0.9, 0.95])
    bad = run("tuner1", [0.5, 0.5, 0.5], stop_at=1)
    assert oracle.state == "finished"
    result = build_result(oracle, exp).to_json()
    trials = {t["id"]: t for t in result["trials"]}
    assert trials[bad]["status"] == "completed" and trials[bad]["score"] == 0.5
    assert trials[bad]["stopped_at"] == 1 and trials[bad]["epochs"] == 1
    assert trials[good]["stopped_at"] is None
    assert result["stopped_early"] == [bad] and result["best"]["trial_id"] == good
    assert registry.get_sample_value("skin_chief_trials_stopped_early_total") == 1
    assert registry.get_sample_value("skin_chief_trials_ended_total",
                                     {"status": "completed"}) == 2


def _as_written(doc: dict):
    """``doc`` completed into the result.json the chief writes, read as every reader reads it."""
    from skin.infra.documents import SearchResult

    return SearchResult.from_json({
        "outcome": "completed", "reason": "", "tuner": "random", "best": None, "counts": {},
        "trials_by_status": {}, **doc,
        "trials": [{"hyperparameters": {}, **t} for t in doc["trials"]]})


def test_the_run_report_shows_stopped_trials_and_the_confirmation(tmp_path):
    from skin.publishing.report import render_search_report

    result = {"objective": "val_auc", "direction": "max", "trials": [
        {"id": "00", "status": "completed", "score": 0.93, "stopped_at": None},
        {"id": "01", "status": "completed", "score": 0.51, "stopped_at": 3},
        {"id": "02", "status": "completed", "score": 0.95, "stopped_at": None}],
        "confirmation": {"candidates": [
            {"trial_id": "02", "n": 3, "mean": 0.90, "std": 0.04, "scores": [0.95, 0.88, 0.87]},
            {"trial_id": "00", "n": 3, "mean": 0.92, "std": 0.01, "scores": [0.93, 0.91, 0.92]}],
            "chosen": "00", "text": "trial 00 chosen over trial 02 by 0.0200 ± 0.0238: within noise"}}
    _, page = render_search_report(_as_written(result), tmp_path)
    text = page.read_text()
    assert "1 stopped early by the median rule" in text
    assert "completed (stopped at epoch 3)" in text
    assert "Confirmation of the pick" in text
    assert "trial 00 chosen over trial 02 by 0.0200 ± 0.0238: within noise" in text
    assert '<tr class="best"><td class="l">00</td>' in text


def test_the_run_report_names_the_validation_fold_of_each_confirmation_score(tmp_path):
    from skin.publishing.report import render_search_report

    result = {"objective": "val_auc", "direction": "max", "trials": [
        {"id": "00", "status": "completed", "score": 0.93, "stopped_at": None}],
        "confirmation": {"folds": [0, 1, 2], "candidates": [
            {"trial_id": "00", "n": 3, "mean": 0.92, "std": 0.01, "scores": [0.93, 0.91, 0.92],
             "folds": [0, 1, 2]}], "chosen": "00", "text": "trial 00: the only candidate"}}
    _, page = render_search_report(_as_written(result), tmp_path)
    text = page.read_text()
    assert "scores (validation fold)" in text
    assert "0.93 (fold 0), 0.91 (fold 1), 0.92 (fold 2)" in text
