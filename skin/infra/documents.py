"""The documents the roles hand each other through the bucket: one to_json/from_json each.

``BestTrial`` (``tuner/best_hyperparameters.json``), ``ServingDocument``
(``serving.json``), ``SearchResult`` and its ``TrialSummary``s (``tuner/result.json``),
``DataManifest`` (``data/manifest.json``), with ``read_best``, ``read_result`` and
``read_manifest``. Where they are stored: :mod:`skin.infra.artifacts`. No TensorFlow, no config
import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from skin.errors import DocumentError
from skin.infra.artifacts import (
    BEST,
    DIRECTIONS,
    MANIFEST,
    RESULT,
    SERVING,
    best_uri,
    result_uri,
)
from skin.infra.storage import join

# from_json refuses what this version cannot read (not a mapping, a required key missing or
# of the wrong type, an unknown direction) with a DocumentError naming the document and the
# key; keys it does not know are ignored (a newer writer may add some).

_NUMBER = (int, float)


def _check(doc: Any, where: str, required: dict[str, tuple],
           optional: dict[str, tuple] | None = None) -> dict:
    if not isinstance(doc, dict):
        raise DocumentError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    for key, types in (*required.items(), *(optional or {}).items()):
        if key not in doc:
            if key in required:
                raise DocumentError(f"{where}: {key!r} is missing")
            continue
        value = doc[key]
        if value is None and type(None) in types:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise DocumentError(f"{where}: {key!r} is {value!r}; expected {names}")
    return doc


def _direction(doc: dict, where: str) -> str:
    if doc["direction"] not in DIRECTIONS:
        raise DocumentError(f"{where}: 'direction' is {doc['direction']!r}; expected 'min' or "
                            "'max'")
    return doc["direction"]


@dataclass(frozen=True)
class BestTrial:
    """``tuner/best_hyperparameters.json``: the chief writes it when the search completes,
    the retrain trains it, ``skin status`` and ``skin run`` show it.

    ``hyperparameters`` leaves out keras-tuner's bookkeeping (``tuner/epochs`` …);
    ``epochs`` is how many epochs the trial trained in all (Hyperband counts the epochs of
    the trials it continued), ``best_epoch`` the epoch of its score; ``confirmation`` the
    search.confirm summary when confirmation picked it (the key is absent otherwise)."""

    trial_id: str
    score: float
    objective: str
    direction: str
    hyperparameters: dict[str, Any]
    epochs: int
    best_epoch: int
    confirmation: dict | None = None

    _REQUIRED: ClassVar[dict[str, tuple]] = {
        "trial_id": (str,), "score": _NUMBER, "objective": (str,), "direction": (str,),
        "hyperparameters": (dict,), "epochs": (int,), "best_epoch": (int,)}

    def to_json(self) -> dict:
        doc = {"trial_id": self.trial_id, "score": self.score, "objective": self.objective,
               "direction": self.direction, "hyperparameters": dict(self.hyperparameters),
               "epochs": self.epochs, "best_epoch": self.best_epoch}
        if self.confirmation is not None:
            doc["confirmation"] = self.confirmation
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str = BEST) -> BestTrial:
        _check(doc, where, cls._REQUIRED, {"confirmation": (dict, type(None))})
        return cls(trial_id=doc["trial_id"], score=doc["score"], objective=doc["objective"],
                   direction=_direction(doc, where), hyperparameters=dict(doc["hyperparameters"]),
                   epochs=doc["epochs"], best_epoch=doc["best_epoch"],
                   confirmation=doc.get("confirmation"))


def _read(storage, uri: str, document):
    """``document.from_json`` of the JSON at ``uri``: FileNotFoundError when absent,
    DocumentError when it is not JSON or not a shape this version can read."""
    try:
        doc = storage.read_json(uri)
    except ValueError as e:  # not JSON (the message names the URI)
        raise DocumentError(str(e)) from None
    return document.from_json(doc, uri)


def read_best(storage, root) -> BestTrial:
    """``tuner/best_hyperparameters.json``; FileNotFoundError until a search completed,
    DocumentError when it is not one this version can read."""
    uri = best_uri(root)
    return _read(storage, uri, BestTrial)


@dataclass(frozen=True)
class ServingDocument:
    """``models/<version>/serving.json`` (also inside ``model.keras`` as
    ``skin_serving.json``): retrain writes it, ``skin evaluate``/``skin predict`` read it.

    The model takes float32 RGB 0..255 ``[batch, image_size, image_size, 3]`` and returns
    P(``class_names[1]``); that class when ``p >= threshold``. ``positive_class``, ``input``
    and ``output`` are written for people and follow from the rest. Only ``threshold`` is
    required on reading (a model published without the others still loads: the image size
    then comes from the model's input); ``data_source`` is what it was trained on."""

    threshold: float
    image_size: int = 0
    class_names: tuple[str, ...] = ("benign", "malignant")  # label 0, label 1 (skin.data.dataset)
    version: str = ""
    data_source: dict | None = None

    def to_json(self) -> dict:
        size, positive = int(self.image_size), self.class_names[1]
        doc = {
            "threshold": float(self.threshold),
            "image_size": size,
            "class_names": list(self.class_names),
            "positive_class": positive,
            "version": self.version,
            "input": f"float32 RGB pixels 0..255, shape [batch, {size}, {size}, 3]",
            "output": f"probability of '{positive}'; predict it when >= threshold",
        }
        if self.data_source is not None:
            doc["data_source"] = dict(self.data_source)
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str = SERVING) -> ServingDocument:
        _check(doc, where, {"threshold": _NUMBER},
               {"image_size": (int, type(None)), "class_names": (list, type(None)),
                "version": (str, type(None)), "data_source": (dict, type(None))})
        names = doc.get("class_names") or cls.class_names
        if len(names) != 2 or not all(isinstance(n, str) for n in names):
            raise DocumentError(f"{where}: 'class_names' is {names!r}; expected two names")
        return cls(threshold=float(doc["threshold"]), image_size=int(doc.get("image_size") or 0),
                   class_names=tuple(names), version=str(doc.get("version") or ""),
                   data_source=doc.get("data_source"))


@dataclass(frozen=True)
class TrialSummary:
    """One trial of ``result.json`` (skin.tuning.results documents every key)."""

    id: str
    status: str  # completed | failed | cancelled (the search failed while it ran) | …
    score: float | None
    hyperparameters: dict[str, Any]
    worker: str | None = None
    epochs: int = 0
    duration: float = 0.0
    attempts: list[dict] = field(default_factory=list)
    message: str | None = None
    continues: str | None = None  # the trial whose weights a Hyperband trial started from
    stopped_at: int | None = None  # search.early_stopping
    confirms: str | None = None  # search.confirm
    seed: int | None = None
    fold: int | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "status": self.status, "score": self.score,
                "hyperparameters": dict(self.hyperparameters), "worker": self.worker,
                "epochs": self.epochs, "duration": self.duration, "attempts": list(self.attempts),
                "message": self.message, "continues": self.continues,
                "stopped_at": self.stopped_at, "confirms": self.confirms, "seed": self.seed,
                "fold": self.fold}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> TrialSummary:
        _check(doc, where, {"id": (str,), "status": (str,), "score": (*_NUMBER, type(None)),
                            "hyperparameters": (dict,)},
               {"worker": (str, type(None)), "epochs": (int, type(None)),
                "duration": (*_NUMBER, type(None)), "attempts": (list, type(None)),
                "stopped_at": (int, type(None)), "seed": (int, type(None)),
                "fold": (int, type(None))})
        return cls(id=doc["id"], status=doc["status"], score=doc["score"],
                   hyperparameters=dict(doc["hyperparameters"]), worker=doc.get("worker"),
                   epochs=doc.get("epochs") or 0, duration=doc.get("duration") or 0.0,
                   attempts=list(doc.get("attempts") or []), message=doc.get("message"),
                   continues=doc.get("continues"), stopped_at=doc.get("stopped_at"),
                   confirms=doc.get("confirms"), seed=doc.get("seed"), fold=doc.get("fold"))


SEARCH_OUTCOMES = ("completed", "failed")


@dataclass(frozen=True)
class SearchResult:
    """``tuner/result.json``: the chief writes it when the search ends (its presence means it
    ended); workers, retrain (ensemble members, the run report), ``skin experiments`` and the
    benchmarks read it. The full shape is documented in skin.tuning.results."""

    outcome: str  # completed | failed
    reason: str
    tuner: str
    objective: str
    direction: str
    best: dict | None = None  # {"trial_id", "score"}
    counts: dict[str, int] = field(default_factory=dict)
    trials_by_status: dict[str, list[str]] = field(default_factory=dict)
    trials: list[TrialSummary] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    stopped_early: list[str] = field(default_factory=list)
    confirmation: dict | None = None
    attempts_by_status: dict[str, int] = field(default_factory=dict)

    _REQUIRED: ClassVar[dict[str, tuple]] = {
        "outcome": (str,), "reason": (str,), "tuner": (str,), "objective": (str,),
        "direction": (str,), "best": (dict, type(None)), "counts": (dict,),
        "trials_by_status": (dict,), "trials": (list,)}
    _OPTIONAL: ClassVar[dict[str, tuple]] = {
        "started_at": (*_NUMBER, type(None)), "finished_at": (*_NUMBER, type(None)),
        "stopped_early": (list, type(None)), "confirmation": (dict, type(None)),
        "attempts_by_status": (dict, type(None))}

    def to_json(self) -> dict:
        return {
            "outcome": self.outcome, "reason": self.reason, "tuner": self.tuner,
            "objective": self.objective, "direction": self.direction,
            "started_at": self.started_at, "finished_at": self.finished_at, "best": self.best,
            "counts": dict(self.counts), "trials_by_status": dict(self.trials_by_status),
            "stopped_early": list(self.stopped_early), "confirmation": self.confirmation,
            "attempts_by_status": dict(self.attempts_by_status),
            "trials": [t.to_json() for t in self.trials],
        }

    def ranked(self) -> list[TrialSummary]:
        """The completed trials with a finite score, best first in the result's direction
        (ties in the order written): the one ranking the report and retrain's ensemble use."""
        scored = [t for t in self.trials
                  if t.status == "completed" and t.score is not None and math.isfinite(t.score)]
        return sorted(scored, key=lambda t: -t.score if self.direction == "max" else t.score)

    @classmethod
    def from_json(cls, doc: Any, where: str = RESULT) -> SearchResult:
        _check(doc, where, cls._REQUIRED, cls._OPTIONAL)
        if doc["outcome"] not in SEARCH_OUTCOMES:
            raise DocumentError(f"{where}: 'outcome' is {doc['outcome']!r}; expected "
                                "'completed' or 'failed'")
        if doc["best"] is not None:
            _check(doc["best"], f"{where}: best", {"trial_id": (str,), "score": _NUMBER})
        return cls(
            outcome=doc["outcome"], reason=doc["reason"], tuner=doc["tuner"],
            objective=doc["objective"], direction=_direction(doc, where), best=doc["best"],
            counts=dict(doc["counts"]), trials_by_status=dict(doc["trials_by_status"]),
            trials=[TrialSummary.from_json(t, f"{where}: trials[{i}]")
                    for i, t in enumerate(doc["trials"])],
            started_at=doc.get("started_at"), finished_at=doc.get("finished_at"),
            stopped_early=list(doc.get("stopped_early") or []),
            confirmation=doc.get("confirmation"),
            attempts_by_status=dict(doc.get("attempts_by_status") or {}))


def read_result(storage, root) -> SearchResult:
    """``tuner/result.json``; FileNotFoundError until the search ended, DocumentError when it
    is not one this version can read."""
    uri = result_uri(root)
    return _read(storage, uri, SearchResult)


MANIFEST_VERSION = 1  # keys added since (folds, fold_counts, an image's fold) are optional


@dataclass(frozen=True)
class DataManifest:
    """``data/manifest.json``, a typed view for readers: stage builds and writes the whole
    document (written last: its presence means staging finished; every key in
    ARCHITECTURE.md), ``doc`` keeps it as written, so its digest (``manifest_sha256``,
    skin.data.dataset.manifest_digest) still checks."""

    doc: dict

    @property
    def version(self) -> int:
        return self.doc["version"]

    @property
    def splits(self) -> dict[str, dict]:
        """``{split: {"count", "benign", "malignant", "shards"}}``."""
        return self.doc["splits"]

    @property
    def folds(self) -> int:
        """Validation folds of the training part; 1 for data staged before folds."""
        return max(1, int(self.doc.get("folds") or 1))

    @property
    def synthetic(self) -> bool | None:
        return self.doc.get("synthetic")

    def count(self, split: str) -> int:
        return int((self.splits.get(split) or {}).get("count") or 0)

    def to_json(self) -> dict:
        return self.doc

    @classmethod
    def from_json(cls, doc: Any, where: str = MANIFEST) -> DataManifest:
        _check(doc, where, {"version": (int,), "splits": (dict,)},
               {"files": (dict,), "images": (list,), "folds": (int,), "fold_counts": (list,),
                "synthetic": (bool, type(None)), "manifest_sha256": (str,),
                "image_size": (int, type(None))})
        if doc["version"] != MANIFEST_VERSION:
            raise DocumentError(f"{where}: not a version {MANIFEST_VERSION} staging manifest "
                                f"(version {doc['version']!r})")
        for name, split in doc["splits"].items():
            _check(split, f"{where}: splits.{name}", {"count": (int,)}, {"shards": (list,)})
        return cls(doc)


def read_manifest(storage, data: str) -> DataManifest:
    """``<data>/manifest.json`` (``data`` is the data folder, ``Experiment.data_uri``);
    FileNotFoundError before staging finished, DocumentError for another shape."""
    uri = join(data, MANIFEST)
    return _read(storage, uri, DataManifest)
