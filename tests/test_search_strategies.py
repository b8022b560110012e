"""Median early stopping and confirmation of the pick on a real chief and real workers
(loopback gRPC, the bucket in the storage emulator), with tests/tuning_entry.py's tiny model."""

from __future__ import annotations

import re

import pytest

from skin.tuning import load_best, load_result
from test_tuning import Search, assert_each_trial_ended_once, search  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_median_stopping_stops_a_learning_rate_that_cannot_learn_and_never_a_good_one(
        search, storage):  # noqa: F811
    start, min_trials = 3, 2
    s = search(max_trials=10, max_epochs=6, lease_seconds=30,
               early_stopping={"rule": "median", "start_epoch": start, "min_trials": min_trials},
               entry_args=["--space", "median"])
    for role in ("chief", "tuner0", "tuner1"):
        s.start(role)
    assert s.wait("chief", timeout=300) == 0, s.log("chief")
    assert s.wait("tuner0") == 0 and s.wait("tuner1") == 0

    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    trials = result["trials"]
    bad = [t for t in trials if t["hyperparameters"]["learning_rate"] == 0.0]
    good = [t for t in trials if t["hyperparameters"]["learning_rate"] > 0]
    assert bad and good, [t["hyperparameters"] for t in trials]
    stopped = [t for t in trials if t["stopped_at"]]
    assert stopped, "no trial was stopped early"
    assert result["stopped_early"] == [t["id"] for t in stopped]
    for t in good:  # a learning model is never stopped
        assert t["stopped_at"] is None, t
        assert t["epochs"] == 6 and t["score"] > 0.6, t
    for t in stopped:  # only models that cannot learn, at once, with their partial score
        assert t["hyperparameters"]["learning_rate"] == 0.0, t
        assert t["stopped_at"] == start and t["epochs"] == start, t
        assert t["status"] == "completed" and t["score"] == pytest.approx(0.5)
        assert re.search(rf"trial {t['id']} stopped early at epoch {start} \(median rule\)",
                         s.log("chief"))
        assert f"trial {t['id']}: the chief stops it early after epoch {start}" in s.log()
    # The rule, checked on the record: a bad trial that started when the completed
    # full-length trials were mostly good (and at least min_trials) had to be stopped.
    for t in bad:
        began = t["attempts"][-1]["started"]
        ended_before = [u for u in trials if u["id"] != t["id"] and not u["stopped_at"]
                        and u["attempts"][-1]["ended"] < began]
        n_good = sum(1 for u in ended_before if u["hyperparameters"]["learning_rate"] > 0)
        if n_good >= min_trials and n_good > len(ended_before) - n_good:
            assert t["stopped_at"] == start, (t, ended_before)


def test_confirmation_trials_run_on_both_workers_and_the_best_mean_wins(
        search, storage, image_folder, tmp_path):  # noqa: F811
    from skin.staging.stage import stage

    # units 1 scores 0.95 once but 0.70/0.72 with other seeds; units 2 scores 0.90/0.89/0.91.
    s = search(max_trials=4, max_epochs=2, confirm={"top": 2, "seeds": 2},
               entry_args=["--space", "inject", "--epoch-seconds", "0.3"])
    # staged data with validation folds (train 0.8 / validation 0.2: the validation split
    # and 4 parts of train); the tiny model ignores the images, the chief reads the folds
    staged = stage(s.exp, storage, source=str(image_folder), work_dir=tmp_path / "stage")
    assert len(staged.folds) == 5
    for role in ("chief", "tuner0", "tuner1"):
        s.start(role)
    assert s.wait("chief", timeout=300) == 0, s.log("chief")
    assert s.wait("tuner0") == 0 and s.wait("tuner1") == 0

    result = load_result(storage, s.exp).to_json()
    assert_each_trial_ended_once(s, result)
    by_id = {t["id"]: t for t in result["trials"]}
    searched = [t for t in result["trials"] if not t["confirms"]]
    confirming = [t for t in result["trials"] if t["confirms"]]
    assert len(searched) == 4 and len(confirming) == 4
    best_single = max(searched, key=lambda t: t["score"])
    assert best_single["hyperparameters"]["units"] == 1 and best_single["score"] == \
        pytest.approx(0.95, abs=1e-5)
    # Confirmation trials are ordinary trials: both workers ran some, after the search.
    assert {t["worker"] for t in confirming} == {"tuner0", "tuner1"}
    last_search_end = max(t["attempts"][-1]["ended"] for t in searched)
    assert all(t["attempts"][0]["started"] >= last_search_end for t in confirming)
    assert sorted((by_id[t["confirms"]]["hyperparameters"]["units"], t["seed"])
                  for t in confirming) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for t in confirming:
        assert t["hyperparameters"] == by_id[t["confirms"]]["hyperparameters"]
        assert t["fold"] == t["seed"]  # seed s validates on fold 1 + (s-1) % 4
    assert all(t["fold"] is None for t in searched)
    worker_logs = s.log("tuner0") + s.log("tuner1")  # the fold reached the hypermodel
    assert len(re.findall(r"trial validates on fold [12]\b", worker_logs)) >= 4
    assert "confirmation trials validate on folds 1..4 of the training part" in s.log("chief")

    c = result["confirmation"]
    assert c["best_single"] == best_single["id"]
    means = {by_id[row["trial_id"]]["hyperparameters"]["units"]: row for row in c["candidates"]}
    assert means[1]["mean"] == pytest.approx((0.95 + 0.70 + 0.72) / 3, abs=1e-5)
    assert means[2]["mean"] == pytest.approx(0.90, abs=1e-5)
    assert means[2]["std"] == pytest.approx(0.01, abs=1e-5)
    assert means[1]["n"] == means[2]["n"] == 3
    assert means[1]["folds"] == means[2]["folds"] == [0, 1, 2] == c["folds"]
    assert by_id[c["chosen"]]["hyperparameters"]["units"] == 2  # the best mean, not the best score
    assert c["runner_up"] == best_single["id"]
    assert c["margin"] == pytest.approx(0.90 - 0.79, abs=1e-5)
    assert c["text"].startswith(f"trial {c['chosen']} chosen over trial {best_single['id']} by ")
    assert c["verdict"] in ("within noise", "beyond noise")

    best = load_best(storage, s.exp).to_json()  # what the retrain publishes
    assert best["trial_id"] == c["chosen"] and best["hyperparameters"]["units"] == 2
    assert best["confirmation"]["chosen"] == c["chosen"]
    assert result["best"]["trial_id"] == c["chosen"]
