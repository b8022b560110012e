"""A trial's files in the bucket and the per-epoch checkpointing of a worker's trial.

:class:`TrialFiles`: ``<root>/trials/<id>/attempt-<n>/`` (``epoch.weights.h5`` +
``epoch.json``: the last finished epoch; ``checkpoint.weights.h5`` + ``build_config.json``:
the best epoch) and their copies in the local trial dir; which attempt a new attempt
resumes from. :class:`EpochReporter`: the Keras callback that, after every epoch,
reports it to the chief (renewing the lease), then saves the checkpoints.
:func:`checkpoint_uri` finds a trial's best weights for the retrain and benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import keras
from keras_tuner.src import errors as kt_errors

from skin.errors import RetryableError
from skin.infra.artifacts import (
    BEST_WEIGHTS,
    BUILD_CONFIG,
    EPOCH_STATE,
    EPOCH_WEIGHTS,
    attempt_of,
    trial_uri,
)
from skin.infra.storage import join
from skin.tuning import checks
from skin.tuning.client import LeaseLostError

if TYPE_CHECKING:
    from skin.tuning.tuner import WorkerTuner

log = logging.getLogger("skin.tuning")


def values_hash(values: dict) -> str:
    """Which configuration a checkpoint belongs to (keras-tuner bookkeeping left out)."""
    plain = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def floats(logs: dict | None) -> dict[str, float]:
    out = {}
    for k, v in (logs or {}).items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class Abandon(Exception):
    """Stop training this trial (lease lost or search over); carries the cause."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class EpochReporter(keras.callbacks.Callback):
    """After each epoch: checkpoint to the bucket, then report to the chief.

    After each batch it tells the trial's :class:`Heartbeat` that training
    moves, and stops the trial when the heartbeat learnt it was lost.
    """

    def __init__(self, tuner: WorkerTuner, trial, execution: int, state: dict):
        super().__init__()
        self.tuner, self.trial, self.execution = tuner, trial, execution
        self.state = state  # epoch.json content, updated in place
        self._t0 = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        beat = self.tuner.heartbeat
        if beat is not None:
            beat.progress()
            beat.check()
        self.tuner.batch_boundary()

    def on_test_batch_end(self, batch, logs=None):
        self.tuner.batch_boundary()

    def on_epoch_end(self, epoch, logs=None):
        tuner, trial_id = self.tuner, self.trial.trial_id
        seconds = time.monotonic() - self._t0
        logs = floats(logs)
        objective = tuner.oracle.objective
        try:  # the chief refuses a report it cannot use (NaN, inf, an AUC above 1)
            checks.check_metrics(logs)
        except ValueError as e:  # a diverged configuration is a result: failed, not retried
            raise kt_errors.FailedTrialError(f"epoch {epoch + 1}: {e} (training diverged)") \
                from None
        # Report first: it renews the lease and tells a worker whose trial was given away to
        # stop before it writes over the new holder's checkpoints.
        if tuner.heartbeat is not None:
            tuner.heartbeat.progress()
        if tuner.watchdog is not None:
            tuner.watchdog.progress()
        try:
            if tuner.oracle.report_epoch(trial_id, int(epoch), logs) == "STOPPED":
                # The chief's early-stopping rule: end the trial now with what it has.
                self.model.stop_training = True
                self.state["stopped"] = int(epoch) + 1
                log.info("trial %s: the chief stops it early after epoch %d", trial_id, epoch + 1)
        except LeaseLostError as e:
            raise Abandon(e) from None
        except RetryableError as e:  # the chief is away (restarting?): keep training
            log.warning("%s: could not report epoch %d of trial %s (%s); training on",
                        tuner.tuner_id, epoch + 1, trial_id, e)
        except Exception as e:  # SearchOver / SearchFailedError: stop now
            if type(e).__name__ in ("SearchOver", "SearchFailedError"):
                raise Abandon(e) from None
            raise
        self.state["history"].append({"epoch": int(epoch), **logs})
        self.state["epoch"] = int(epoch) + 1
        self.state["worker"] = tuner.tuner_id
        if objective.has_value(logs):
            value = objective.get_value(logs)
            best = self.state.get("best_value")
            if best is None or objective.better_than(value, best):
                self.state["best_value"] = float(value)
                tuner.files.save_best(trial_id, self.model, tuner.attempt)
        tuner.files.save_epoch(trial_id, self.model, self.state, tuner.attempt)
        images = tuner.images_per_epoch
        tuner.hooks.epoch_ended(int(epoch), seconds,
                                images / seconds if images and seconds > 0 else 0.0, logs)
        shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items())
        log.info("trial %s epoch %d/%d on %s: %s (%.1f s)", trial_id, epoch + 1,
                 self.state["epochs"], tuner.tuner_id, shown, seconds)


class TrialFiles:
    """A trial's files in the bucket (``<root>/trials/<id>/attempt-<n>/``) and in a local
    trial dir."""

    def __init__(self, storage, trials_uri: str, local_dir):
        self.storage, self.trials_uri = storage, trials_uri
        self.local_dir = Path(local_dir)

    def uri(self, trial_id: str, name: str, attempt: int) -> str:
        return trial_uri(self.trials_uri, trial_id, name, attempt)

    def local(self, trial_id: str, name: str) -> Path:
        path = self.local_dir / f"trial_{trial_id}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def attempts_with(self, trial_id: str, name: str) -> list[int]:
        """The attempts of a trial that have ``name`` in the bucket, newest first."""
        return attempts_with(self.storage, self.trials_uri, trial_id, name)

    def save_best(self, trial_id: str, model, attempt: int) -> None:
        path = self.local(trial_id, BEST_WEIGHTS)
        model.save_weights(str(path))
        build = self.local(trial_id, BUILD_CONFIG)
        build.write_text(json.dumps(model.get_build_config(), default=str))
        self.storage.upload_file(build, self.uri(trial_id, BUILD_CONFIG, attempt))
        self.storage.upload_file(path, self.uri(trial_id, BEST_WEIGHTS, attempt))

    def save_epoch(self, trial_id: str, model, state: dict, attempt: int) -> None:
        path = self.local(trial_id, EPOCH_WEIGHTS)
        model.save_weights(str(path))
        # Weights first: epoch.json names an epoch only once its weights are in the bucket.
        self.storage.upload_file(path, self.uri(trial_id, EPOCH_WEIGHTS, attempt))
        self.storage.write_json(self.uri(trial_id, EPOCH_STATE, attempt), state)

    def load_epoch_state(self, trial_id: str, attempt: int) -> tuple[dict | None, int]:
        """The newest saved epoch of this attempt or an earlier one: (epoch.json, its attempt)."""
        for n in self.attempts_with(trial_id, EPOCH_STATE):
            if n > attempt:  # a newer holder's: not ours to resume (we are the stale one)
                continue
            try:
                return self.storage.read_json(self.uri(trial_id, EPOCH_STATE, n)), n
            except FileNotFoundError:
                continue
        return None, attempt

    def resume_state(self, trial_id: str, attempt: int, digest: str, first: int, last: int,
                     worker: str) -> tuple[dict, int]:
        """The epoch state ``attempt`` trains on, and the attempt whose files it names: its own
        (a replacement process of the same attempt), an earlier attempt's (its checkpoint is
        adopted), or a fresh state at ``first``.

        ``attempt_first`` is the epoch the attempt took the trial up at. A replacement process
        keeps it: the attempt's span runs from there, whatever epoch reports the chief lost."""
        state, source = self.load_epoch_state(trial_id, attempt)
        if state is not None and (state.get("hash") != digest or state.get("epochs") != last):
            log.warning("trial %s: ignoring an epoch checkpoint of another configuration",
                        trial_id)
            state = None
        if state is None:
            state, source = {"trial_id": trial_id, "hash": digest, "epochs": last,
                             "execution": 0, "worker": worker, "epoch": first,
                             "attempt_first": first, "history": [], "done": [],
                             "best_value": None}, attempt
        elif source != attempt:
            self.adopt(trial_id, source, attempt)
            state["attempt_first"] = int(state["epoch"])
        else:
            state.setdefault("attempt_first", int(state["epoch"]))
        state["attempt"] = attempt
        return state, source

    def adopt(self, trial_id: str, source: int, attempt: int) -> None:
        """Copy the best-epoch checkpoint of attempt ``source`` into ``attempt``: the new
        attempt's folder is whole, whatever the old holder writes into its own later."""
        for name in (BUILD_CONFIG, BEST_WEIGHTS):
            try:
                path = self.fetch(trial_id, name, source)
            except FileNotFoundError:
                continue
            self.storage.upload_file(path, self.uri(trial_id, name, attempt))

    def drop_epoch_state(self, trial_id: str, attempt: int) -> None:
        self.storage.delete(self.uri(trial_id, EPOCH_STATE, attempt))
        self.storage.delete(self.uri(trial_id, EPOCH_WEIGHTS, attempt))

    def fetch(self, trial_id: str, name: str, attempt: int | None = None) -> Path:
        """Download one file of a trial into the local trial dir (always fresh); without an
        ``attempt``, from the newest attempt that has it."""
        if attempt is None:
            found = self.attempts_with(trial_id, name)
            if not found:
                raise FileNotFoundError(f"{join(self.trials_uri, trial_id)}: no attempt has "
                                        f"{name}")
            attempt = found[0]
        path = self.local(trial_id, name)
        self.storage.download_file(self.uri(trial_id, name, attempt), path)
        return path


def attempts_with(storage, trials_uri: str, trial_id: str, name: str) -> list[int]:
    """The attempts of trial ``trial_id`` that have file ``name``, newest first."""
    prefix = join(trials_uri, trial_id)
    found = []
    for uri in storage.list(prefix):
        rel = uri[len(prefix):].strip("/").split("/")
        if len(rel) == 2 and rel[1] == name and attempt_of(rel[0]) is not None:
            found.append(attempt_of(rel[0]))
    return sorted(found, reverse=True)


def checkpoint_uri(storage, trials_uri: str, trial_id: str, name: str = BEST_WEIGHTS) -> str:
    """Where trial ``trial_id``'s best-epoch weights are: its newest attempt that has them."""
    found = attempts_with(storage, trials_uri, trial_id, name)
    if not found:
        raise FileNotFoundError(f"{join(trials_uri, trial_id)}: no attempt has {name}")
    return trial_uri(trials_uri, trial_id, name, found[0])


def load_weights(model, path) -> None:
    """Load weights (and, when the file has it, the optimizer state) into ``model``."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    model.load_weights(str(path))
