"""The median stopping rule, and the replay benchmark (bench/search_replay.py) driving the
product's oracle, stopping and confirmation code over recorded learning curves."""

from __future__ import annotations

import sys
from pathlib import Path

import keras_tuner
import pytest

from skin.tuning.stopping import MedianStopping

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import search_replay  # noqa: E402

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


def test_the_recorded_smoke_curves_replay():
    path = REPO / "bench" / "search_curves_smoke.json"
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
