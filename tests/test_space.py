"""The search space in the experiment file (skin.model.space), its fingerprint, and the shipped space."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from skin.errors import ConfigError
from skin.infra.config import (
    DEFAULT_EXPERIMENT_FILE,
    QUICKSTART_EXPERIMENT_FILE,
    load_experiment,
    parse_experiment,
)
from skin.model import space as S


def doc(space=None, **search):
    d = {"apiVersion": "skin/v1", "kind": "Experiment",
         "search": {"tuner": "random", "max_trials": 5, "max_epochs": 4, **search}}
    if space is not None:
        d["search"]["space"] = space
    return d


def exp_of(space=None, **search):
    return parse_experiment(doc(space, **search), env={})


GOOD = [
    {"blocks": {"type": "choice", "values": [3, 4], "default": 4}},
    {"filters": {"type": "int", "min": 8, "max": 64, "step": 8}},
    {"filters": {"type": "int", "min": 8, "max": 64, "sampling": "log"}},
    {"learning_rate": {"type": "float", "min": 1e-4, "max": 1e-2, "sampling": "log"}},
    {"dropout": {"type": "float", "min": 0.0, "max": 0.5, "step": 0.1, "default": 0.2}},
    {"batch_norm": {"type": "boolean", "default": False}},
    {"pooling": {"type": "fixed", "value": "max"}},
    {"class_weight": {"type": "choice", "values": [True, False]}},
    {"weight_decay": {"type": "int", "min": 0, "max": 0}},  # an int range for a float
    {},
]


@pytest.mark.parametrize("space", GOOD, ids=[next(iter(s), "empty") for s in GOOD])
def test_good_spaces_parse_and_fit_the_model(space):
    exp = exp_of(space)
    S.check_model_space(exp.search)
    effective = S.space_of(exp)
    assert list(effective) == list(S.NAMES)  # canonical order, every hyperparameter
    for name in space:
        assert effective[name]["type"] == space[name]["type"]


# (space or search keys, the key the error must name, words it must say)
BAD = [
    ({"blocks": [3, 4]}, "search.space.blocks", "type:"),
    ({"blocks": {"type": "range", "values": [1]}}, "search.space.blocks.type", "choice"),
    ({"blocks": {"type": "choice", "values": []}}, "search.space.blocks.values", "non-empty"),
    ({"blocks": {"type": "choice"}}, "search.space.blocks.values", "missing"),
    ({"blocks": {"type": "choice", "values": [3, "4"]}}, "search.space.blocks.values", "one type"),
    ({"blocks": {"type": "choice", "values": [3, 3]}}, "search.space.blocks.values", "distinct"),
    ({"blocks": {"type": "choice", "values": [3, 4], "default": 5}}, "search.space.blocks.default",
     "one of the values"),
    ({"blocks": {"type": "choice", "values": [3], "step": 1}}, "search.space.blocks.step",
     "unknown key"),
    ({"filters": {"type": "int", "min": 64, "max": 8}}, "search.space.filters.max", "empty"),
    ({"filters": {"type": "int", "min": 8.5, "max": 16}}, "search.space.filters.min",
     "an integer"),
    ({"filters": {"type": "int", "min": 8, "max": 16, "step": 0}}, "search.space.filters.step",
     "> 0"),
    ({"dropout": {"type": "float", "min": 0.3, "max": 0.3}}, "search.space.dropout.max", "empty"),
    ({"learning_rate": {"type": "float", "min": 0.0, "max": 0.1, "sampling": "log"}},
     "search.space.learning_rate.min", "> 0 with sampling: log"),
    ({"learning_rate": {"type": "float", "min": 1e-4, "max": 0.1, "sampling": "cubic"}},
     "search.space.learning_rate.sampling", "linear"),
    ({"batch_norm": {"type": "boolean", "default": "yes"}}, "search.space.batch_norm.default",
     "true or false"),
    ({"pooling": {"type": "fixed"}}, "search.space.pooling.value", "missing"),
]


@pytest.mark.parametrize("space,key,words", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_spaces_exit_2_naming_the_key(space, key, words):
    with pytest.raises(ConfigError) as e:
        exp_of(space)
    assert e.value.exit_code == 2
    assert str(e.value).startswith(key + ":"), str(e.value)
    assert words in str(e.value)


# Structurally fine, but not something the skin CNN knows or can build.
BAD_FOR_MODEL = [
    ({"block_count": {"type": "choice", "values": [3]}}, {}, "search.space.block_count",
     "unknown hyperparameter"),
    ({}, {"lr": 0.1}, "search.fixed.lr", "unknown hyperparameter"),
    ({"pooling": {"type": "choice", "values": ["avg", "mean"]}}, {}, "search.space.pooling.values",
     "'mean' is not valid for pooling"),
    ({"stem": {"type": "int", "min": 2, "max": 4}}, {}, "search.space.stem.max",
     "3 is not valid for stem"),  # 3 lies in the range
    ({"blocks": {"type": "int", "min": 0, "max": 4}}, {}, "search.space.blocks.min",
     "0 is not valid"),
    ({"dropout": {"type": "float", "min": 0.0, "max": 1.5}}, {}, "search.space.dropout.max",
     "1.5 is not valid"),
    ({"filters": {"type": "float", "min": 8.0, "max": 32.0}}, {}, "search.space.filters.type",
     "integers"),
    ({"batch_norm": {"type": "int", "min": 0, "max": 1}}, {}, "search.space.batch_norm.type",
     "true or false"),
    ({"learning_rate": {"type": "choice", "values": ["3e-4", "1e-3"]}}, {},  # YAML 1.1 strings
     "search.space.learning_rate.values", "'3e-4' is not valid"),
    ({"optimizer": {"type": "fixed", "value": "lamb"}}, {}, "search.space.optimizer.value",
     "'lamb' is not valid"),
    ({}, {"pooling": "mean"}, "search.fixed.pooling", "'mean' is not valid"),
    ({"pooling": {"type": "choice", "values": ["avg"]}}, {"pooling": "avg"}, "search.fixed.pooling",
     "also in search.space"),
]


@pytest.mark.parametrize("space,fixed,key,words", BAD_FOR_MODEL,
                         ids=[b[2] + ":" + b[3] for b in BAD_FOR_MODEL])
def test_spaces_the_model_cannot_build_exit_2_naming_the_key(space, fixed, key, words):
    exp = exp_of(space, fixed=fixed)  # any hypermodel could take it
    with pytest.raises(ConfigError) as e:
        S.check_model_space(exp.search)
    assert e.value.exit_code == 2
    assert str(e.value).startswith(key + ":"), str(e.value)
    assert words in str(e.value)


def test_the_cli_refuses_a_bad_space_before_any_work(tmp_path, capsys):
    import yaml

    from skin.cli import main

    bad = doc({"pooling": {"type": "choice", "values": ["avg", "mean"]}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["stage", "--config", str(path)]) == 2
    assert "search.space.pooling.values" in capsys.readouterr().err


def test_early_stopping_and_confirm_are_validated():
    with pytest.raises(ConfigError, match=r"^search\.early_stopping\.rule: 'median' is not valid "
                                          r"with search\.tuner 'hyperband'"):
        exp_of(tuner="hyperband", early_stopping={"rule": "median"})
    with pytest.raises(ConfigError, match=r"^search\.early_stopping\.start_epoch"):
        exp_of(early_stopping={"rule": "median", "start_epoch": 4})  # max_epochs 4
    with pytest.raises(ConfigError, match=r"^search\.early_stopping\.rule: 'asha'"):
        exp_of(early_stopping={"rule": "asha"})
    with pytest.raises(ConfigError, match=r"^search\.confirm\.top"):
        exp_of(confirm={"top": -1})
    exp = exp_of(early_stopping={"rule": "median", "start_epoch": 2, "min_trials": 2},
                 confirm={"top": 3, "seeds": 2})
    assert exp.search.early_stopping.min_trials == 2 and exp.search.confirm.top == 3


# -- the shipped experiments state today's space ------------------------------------------------

def test_the_shipped_experiments_state_the_default_space():
    for path in (DEFAULT_EXPERIMENT_FILE, QUICKSTART_EXPERIMENT_FILE):
        exp = load_experiment(path, env={})
        assert exp.search.space, f"{path} does not state its space"
        S.check_model_space(exp.search)
        effective = S.space_of(exp)
        for name, spec in effective.items():
            if spec["type"] != "fixed":
                assert spec == S.DEFAULT_SPACE[name], name
    quick = load_experiment(QUICKSTART_EXPERIMENT_FILE, env={})
    assert S.space_of(quick) == S.DEFAULT_SPACE


def test_a_yaml_space_samples_the_same_trials_as_the_default_space():
    """The same seed draws the same hyperparameters from the stated space as from the model's
    default space (what the search sampled before the space moved into the file)."""

    from skin.model import hypermodel as M
    from skin.tuning.oracle import make_oracle

    stated = load_experiment(QUICKSTART_EXPERIMENT_FILE, env={"SKIN_TUNER": "random"})
    unstated = dataclasses.replace(stated, search=dataclasses.replace(stated.search, space={}))
    draws = []
    for exp in (stated, unstated):
        oracle = make_oracle(exp)
        hp = oracle.get_space()
        M.SkinHyperModel(exp).values(hp)
        oracle.update_space(hp)
        draws.append([oracle.assign(f"tuner{i}").trial.hyperparameters.values for i in range(8)])
    assert draws[0] == draws[1]
    assert len({json.dumps(v, sort_keys=True) for v in draws[0]}) == 8


def test_the_hypermodel_declares_every_kind_from_a_yaml_space():
    import keras_tuner
    import yaml

    from skin.model import hypermodel as M

    text = """
    stem: {type: fixed, value: 2}
    blocks: {type: int, min: 1, max: 2}
    filters: {type: int, min: 4, max: 16, step: 4}
    learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, sampling: log}
    dropout: {type: float, min: 0.0, max: 0.5, step: 0.25}
    batch_norm: {type: boolean, default: false}
    pooling: {type: choice, values: [max, avg]}
    dense_units: {type: choice, values: [0, 8]}
    """
    exp = exp_of(yaml.safe_load(text))
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, image_size=32))
    hm = M.SkinHyperModel(exp)
    hp = keras_tuner.HyperParameters()
    hm.build(hp)
    kinds = {h.name: type(h).__name__ for h in hp.space}
    assert kinds["stem"] == "Fixed" and kinds["blocks"] == "Int" and kinds["filters"] == "Int"
    assert kinds["learning_rate"] == "Float" and kinds["dropout"] == "Float"
    assert kinds["batch_norm"] == "Boolean" and kinds["pooling"] == "Choice"
    lr = next(h for h in hp.space if h.name == "learning_rate")
    assert (lr.min_value, lr.max_value, lr.sampling) == (1e-4, 1e-2, "log")
    assert hp.values["pooling"] == "max" and hp.values["batch_norm"] is False
    # Other values of every kind build a model too.
    for i in range(3):
        sample = keras_tuner.HyperParameters()
        for h in hp.space:
            sample.merge([h])
            sample.values[h.name] = h.random_sample(i)
        model = hm.build(sample)
        assert model.output_shape == (None, 1)
        assert 1e-4 <= sample.values["learning_rate"] <= 1e-2
        assert sample.values["filters"] in (4, 8, 12, 16)


# -- the fingerprint ---------------------------------------------------------------------------

def _old_fingerprint(exp) -> str:
    """The chief's fingerprint before search.space (frozen copy of the older code)."""
    s = exp.search
    d = {"tuner": s.tuner, "objective": s.objective, "max_trials": s.max_trials,
         "max_epochs": s.max_epochs, "factor": s.hyperband_factor,
         "iterations": s.hyperband_iterations, "executions": s.executions_per_trial,
         "fixed": s.fixed, "seed": exp.data.seed}
    b = exp.backbone
    if b.name != "none":
        d["backbone"] = {"name": b.name, "weights": b.weights.strip(), "trainable": b.trainable}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _with(exp, **search):
    return dataclasses.replace(exp, search=dataclasses.replace(exp.search, **search))


def test_the_fingerprint_ignores_keys_the_tuner_ignores():
    from skin.tuning.fingerprint import search_fingerprint as fp

    hb = load_experiment(DEFAULT_EXPERIMENT_FILE, env={})
    assert hb.search.tuner == "hyperband"
    assert fp(_with(hb, max_trials=7)) == fp(hb)  # hyperband sets its own trial count
    assert fp(_with(hb, lease_seconds=5.0, max_trial_retries=0)) == fp(hb)  # operations only
    assert fp(_with(hb, hyperband_factor=3)) != fp(hb)
    assert fp(_with(hb, max_epochs=9)) != fp(hb)
    rnd = _with(hb, tuner="random")
    assert fp(_with(rnd, hyperband_factor=3, hyperband_iterations=2)) == fp(rnd)
    assert fp(_with(rnd, max_trials=7)) != fp(rnd)
    # The space counts, stated or by default, and so do early stopping and confirmation.
    space = dict(hb.search.space, blocks={"type": "choice", "values": [3, 4]})
    assert fp(_with(hb, space=space)) != fp(hb)
    stated = _with(hb, space={})  # the same space by default
    assert fp(stated) == fp(hb)
    assert fp(_with(rnd, early_stopping=dataclasses.replace(rnd.search.early_stopping,
                                                            rule="median"))) != fp(rnd)
    assert fp(_with(hb, confirm=dataclasses.replace(hb.search.confirm, top=3))) != fp(hb)


def test_a_search_saved_before_the_space_moved_to_the_file_still_resumes():
    from skin.tuning.fingerprint import fingerprint_matches, search_fingerprint

    for path in (DEFAULT_EXPERIMENT_FILE, QUICKSTART_EXPERIMENT_FILE):
        exp = load_experiment(path, env={})
        # What the older chief wrote for the same file without search.space (fixed as it was).
        old = _old_fingerprint(_with(exp, space={}))
        assert fingerprint_matches(exp, old), path
        assert fingerprint_matches(exp, search_fingerprint(exp))
        # A changed search does not resume the old one ...
        narrower = _with(exp, space={**exp.search.space,
                                     "blocks": {"type": "choice", "values": [3]}})
        assert not fingerprint_matches(narrower, old)
        assert not fingerprint_matches(_with(exp, max_epochs=exp.search.max_epochs + 1), old)
        assert not fingerprint_matches(
            _with(exp, confirm=dataclasses.replace(exp.search.confirm, top=2)), old)
        assert not fingerprint_matches(exp, None) and not fingerprint_matches(exp, "")
    # A pinned value stated as {type: fixed} is the same search as search.fixed.
    exp = exp_of(fixed={"pooling": "avg"})
    moved = exp_of({"pooling": {"type": "fixed", "value": "avg"}})
    assert fingerprint_matches(moved, _old_fingerprint(exp))
