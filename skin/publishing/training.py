"""Training the members of a published model.

:func:`train` trains one configuration, early-stopped on validation; with
``retrain.ensemble`` N > 1, :func:`members_to_retrain` picks the N best distinct completed
trials of the search (:func:`top_trials`) and :func:`check_members` checks every one
against the experiment's search space before anything is trained.
:func:`split_predictions` gives a model's P(malignant) over a staged split.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from skin.errors import ConfigError, DataError
from skin.infra import artifacts, documents
from skin.model.space import hyperparameters_from_values
from skin.serving.contract import malignant_probability
from skin.serving.scoring import roc_auc

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 32


class Curves(keras.callbacks.Callback):
    """Records every epoch's logs and writes one log line per epoch."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.history: dict[str, list[float]] = {}
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        shown = []
        for key, value in sorted((logs or {}).items()):
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            self.history.setdefault(key, []).append(value)
            shown.append(f"{key}={value:.4f}")
        log.info("retrain epoch %d/%d (%.0f s): %s", epoch + 1, self.epochs,
                 time.monotonic() - self._started, " ".join(shown))


def _epochs(exp, best: dict) -> int:
    if exp.retrain.epochs:
        return exp.retrain.epochs
    values = best.get("hyperparameters") or {}
    for candidate in (best.get("epochs"), values.get("tuner/epochs")):
        if candidate:
            return int(candidate)
    return exp.search.max_epochs


def train(exp, hypermodel, best: dict, data_dir: Path, *, seed: int | None = None) \
        -> tuple[Any, dict]:
    """The final model, early-stopped on validation (``retrain.patience``), with the best
    validation epoch's weights restored (``retrain.restore_best``) or the last epoch's.

    ``seed``: the random seed of this training (default ``data.seed``).
    """
    keras.utils.set_random_seed(exp.data.seed if seed is None else seed)
    hp = hyperparameters_from_values(best.get("hyperparameters") or {})
    model = hypermodel.build(hp)
    epochs = _epochs(exp, best)
    monitor, mode = exp.search.objective, exp.search.direction
    curves = Curves(epochs)
    # patience 0 switches early stopping off. restore_best: the best validation epoch's
    # weights are published, else the last epoch's (chosen by no one: validation then
    # only picks the threshold, so its figures stay an unbiased estimate).
    restore = exp.retrain.restore_best
    stopper = keras.callbacks.EarlyStopping(
        monitor=monitor, mode=mode, restore_best_weights=restore,
        patience=exp.retrain.patience if exp.retrain.patience else epochs + 1)
    log.info("retraining trial %s's configuration for up to %d epochs (early stopping on %s, "
             "patience %s; publishing the %s epoch's weights)", best.get("trial_id", "?"), epochs,
             monitor, exp.retrain.patience or "off", "best" if restore else "last")
    started = time.monotonic()
    hypermodel.fit(hp, model, data_dir=data_dir, epochs=epochs, callbacks=[stopper, curves])
    values = curves.history.get(monitor, [])
    best_epoch = (int(np.argmin(values) if mode == "min" else np.argmax(values)) + 1
                  if values else None)
    trained = len(next(iter(curves.history.values()), []))
    training = {
        "epochs_budget": epochs,
        "epochs_trained": trained,
        "best_epoch": best_epoch,
        "restored_best": restore,
        "published_epoch": best_epoch if restore else (trained or None),
        "monitor": monitor,
        "patience": exp.retrain.patience,
        "seconds": round(time.monotonic() - started, 1),
        "history": curves.history,
    }
    return model, training


def split_predictions(model, data_dir: Path, split: str, image_size: int) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """``(labels, P(malignant))`` over a staged split, in the dataset's order."""
    from skin.data import dataset as skin_data

    labels, probabilities = [], []
    ds = skin_data.dataset(data_dir, split, image_size, EVAL_BATCH_SIZE, training=False)
    for images, y in ds:
        labels.append(np.asarray(y).reshape(-1))
        probabilities.append(malignant_probability(model, np.asarray(images)))
    if not labels:
        raise DataError(f"the {split} split is empty")
    return (np.rint(np.concatenate(labels)).astype(np.int64),
            np.concatenate(probabilities))


def top_trials(result: documents.SearchResult | None, n: int, *, best: dict | None = None,
               objective: str = "val_auc") -> list[dict]:
    """The ``n`` best completed trials of a search with distinct hyperparameters, best first.

    ``result``: ``tuner/result.json``; trials ranked by score in its ``direction`` (without
    a result, ``objective``'s: skin.infra.artifacts.objective_direction), ties in its order. A
    configuration that several trials share (Hyperband continues one across rounds)
    counts once, with its best trial. ``best`` (``best_hyperparameters.json``), when given,
    comes first whatever the result says. Each entry is shaped like ``best``:
    ``{"trial_id", "score", "objective", "epochs", "hyperparameters"}``. Fewer than ``n``
    when fewer distinct configurations completed.
    """
    from skin.tuning.checkpoints import values_hash  # what makes two trials one configuration

    if result is not None:
        objective = result.objective
    else:
        artifacts.objective_direction(objective)  # a ValueError for an unknown objective
    scored = result.ranked() if result is not None else []
    picked: list[dict] = []
    seen: set[str] = set()
    if best is not None and n > 0:
        picked.append(dict(best))
        seen.add(values_hash(best.get("hyperparameters") or {}))
    for t in scored:
        if len(picked) >= n:
            break
        key = values_hash(t.hyperparameters)
        if key in seen:
            continue
        seen.add(key)
        picked.append({"trial_id": t.id, "score": t.score, "objective": objective,
                       "epochs": t.epochs or None, "hyperparameters": dict(t.hyperparameters)})
    return picked


def members_to_retrain(exp, best: dict, result: documents.SearchResult | None) -> list[dict]:
    """The trials to retrain: the best alone, or the top ``retrain.ensemble``."""
    wanted = exp.retrain.ensemble
    if wanted <= 1:
        return [best]
    members = top_trials(result, wanted, best=best, objective=exp.search.objective)
    if len(members) < wanted:
        log.warning("retrain.ensemble is %d but the search has %d distinct completed "
                    "configuration(s)%s: ensembling %d", wanted, len(members),
                    "" if result is not None else " (no tuner/result.json)", len(members))
    log.info("ensemble of %d: trials %s", len(members),
             ", ".join(str(m.get("trial_id")) for m in members))
    return members


def validation_auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    auc = roc_auc(labels, probabilities)
    return None if math.isnan(auc) else auc


def check_members(exp, hypermodel, specs: list[dict]) -> None:
    """Train only what the search could have issued: every configuration's values allowed by
    the experiment's search space and ``search.fixed``, nothing missing, nothing extra.

    The space is built the way the chief builds it (``populate_space``), from the code and
    the experiment file, not from anything in the bucket. A mismatch is a ConfigError
    (exit 2) naming the key and the value, raised before anything is trained or published.
    """
    from skin.tuning.checks import check_values
    from skin.tuning.chief import populate_space
    from skin.tuning.oracle import make_oracle

    oracle = make_oracle(exp, leased=False)
    populate_space(oracle, hypermodel)
    for spec in specs:
        values = {k: v for k, v in (spec.get("hyperparameters") or {}).items()
                  if not k.startswith("tuner/")}  # keras-tuner's bookkeeping, not the model's
        try:
            check_values(oracle.hyperparameters, values, exp.search.fixed)
        except ValueError as e:
            raise ConfigError(f"{artifacts.best_uri(exp)} (trial "
                              f"{spec.get('trial_id', '?')}): {e}; nothing was trained or "
                              "published") from None
