"""Which search a saved state belongs to: a restarted chief must not resume another one.

The fingerprint covers what changes the search: the tuner, the objective, the trial
length, the seed, the effective space (``skin.model.space.effective_space``: every
hyperparameter's type and range, stated or default), the tuner's own budget settings
(``max_trials`` for random and Bayesian, the factor and iterations for Hyperband: a key a
tuner ignores does not count), early stopping and confirmation when they are on, and the
backbone when there is one.

Saved searches from before ``search.space`` existed carry the older fingerprint
(:func:`legacy_fingerprint`: the budget keys of every tuner and ``search.fixed``); a
chief still resumes them where the experiment asks for the same search: the default
space, the same pinned values, no early stopping or confirmation
(:func:`fingerprint_matches`).
"""

from __future__ import annotations

import hashlib
import json

from skin.model import space as skin_space


def _hash(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _backbone(exp) -> dict | None:
    b = exp.backbone
    if b.name == "none":
        return None
    return {"name": b.name, "weights": b.weights.strip(), "trainable": b.trainable}


def _space(exp) -> dict[str, dict]:
    """The effective space, plus names only another hypermodel knows (tests' tiny models)."""
    s = exp.search
    out = dict(skin_space.space_of(exp))
    for name, spec in s.space.items():
        out.setdefault(name, spec)
    for name, value in s.fixed.items():
        out.setdefault(name, {"type": "fixed", "value": value})
    return out


def search_fingerprint(exp) -> str:
    s = exp.search
    doc = {"version": 2, "tuner": s.tuner, "objective": s.objective, "max_epochs": s.max_epochs,
           "executions": s.executions_per_trial, "seed": exp.data.seed,
           "space": [[name, spec] for name, spec in _space(exp).items()]}
    if s.tuner == "hyperband":
        doc.update(factor=s.hyperband_factor, iterations=s.hyperband_iterations)
    else:
        doc["max_trials"] = s.max_trials
    if s.early_stopping.rule != "none":
        es = s.early_stopping
        doc["early_stopping"] = {"rule": es.rule, "start_epoch": es.start_epoch,
                                 "min_trials": es.min_trials}
    if s.confirm.top:
        doc["confirm"] = {"top": s.confirm.top, "seeds": s.confirm.seeds}
        if not s.confirm.folds:  # only when off: searches saved before folds still resume
            doc["confirm"]["folds"] = False
    backbone = _backbone(exp)
    if backbone is not None:
        doc["backbone"] = backbone
    return _hash(doc)


def legacy_fingerprint(exp) -> str | None:
    """The fingerprint the chief wrote before ``search.space``, when this experiment asks for
    exactly that search; None when it asks for something the older chief could not do."""
    s = exp.search
    if s.early_stopping.rule != "none" or s.confirm.top:
        return None
    b = exp.backbone
    defaults = skin_space.effective_space(type("S", (), {"fixed": {}, "space": {}})(), b.name,
                                          pretrained=bool(b.weights.strip()))
    space = _space(exp)
    fixed = {}
    for name, spec in space.items():
        if spec["type"] == "fixed":
            fixed[name] = spec["value"]
        elif defaults.get(name) != spec:
            return None
    doc = {"tuner": s.tuner, "objective": s.objective, "max_trials": s.max_trials,
           "max_epochs": s.max_epochs, "factor": s.hyperband_factor,
           "iterations": s.hyperband_iterations, "executions": s.executions_per_trial,
           "fixed": fixed, "seed": exp.data.seed}
    backbone = _backbone(exp)
    if backbone is not None:
        doc["backbone"] = backbone
    return _hash(doc)


def fingerprint_matches(exp, saved: str | None) -> bool:
    """Whether a saved search (its header's fingerprint) is this experiment's search."""
    return bool(saved) and saved in (search_fingerprint(exp), legacy_fingerprint(exp))
