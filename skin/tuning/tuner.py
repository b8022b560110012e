"""The worker's keras-tuner ``Tuner``: trials run here, checkpoints go through the bucket.

:class:`WorkerTuner` subclasses ``keras_tuner.Tuner`` and keeps its model
building (``_try_build``, ``max_model_size``), callbacks handling and result
conventions. It replaces what assumes one shared disk or one process:

- ``run_trial`` trains each execution with an epoch callback that, after every
  epoch, uploads ``trials/<id>/attempt-<n>/epoch.weights.h5`` + ``epoch.json``
  (the last finished epoch, so a restarted or different worker resumes there),
  uploads ``checkpoint.weights.h5`` when the objective improved (the best
  epoch, what Hyperband's next round starts from), and reports the epoch to
  the chief, which renews the trial's lease. ``<n>`` is the attempt the chief
  handed out: a worker that lost its lease (frozen, partitioned) and wakes up
  writes only below its own, older attempt, never over the new holder's
  files; a new attempt resumes from the newest attempt that saved an epoch,
  and a trial's checkpoint is read from its newest attempt that has one;
- a trial with ``tuner/trial_id`` (Hyperband's next round) starts from that
  trial's checkpoint, fetched from the bucket into the local trial dir that
  keras-tuner's ``load_model`` reads, whichever worker trained it;
- :meth:`work` asks the chief for trials until the search ends, sleeping with
  backoff while there is none (stock keras-tuner asks again at once).

Weights files hold the optimizer state too (Keras 3 ``save_weights``); it is
restored by building the optimizer before loading.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import statistics
import threading
import time
import traceback
from pathlib import Path

import keras
import keras_tuner
from keras_tuner.src import errors as kt_errors
from keras_tuner.src.engine import tuner_utils

from skin.artifacts import (
    BEST_WEIGHTS,
    BUILD_CONFIG,
    EPOCH_STATE,
    EPOCH_WEIGHTS,
    attempt_of,
    trial_uri,
)
from skin.errors import RetryableError
from skin.storage import join
from skin.tuning import checks
from skin.tuning.client import LeaseLostError
from skin.tuning.hooks import WorkerHooks

log = logging.getLogger("skin.tuning")

IDLE_MIN_S, IDLE_MAX_S = 0.25, 2.0


@contextlib.contextmanager
def stock_distribution_off():
    """Hide ``KERASTUNER_ORACLE_*`` while a keras-tuner Tuner is constructed.

    ``BaseTuner.__init__`` reads them from ``os.environ`` and, when set, wraps
    its oracle in keras-tuner's own gRPC client (and needs ``KERASTUNER_TUNER_ID``
    in the environment too). We wire the chief and the client explicitly.
    """
    names = ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def values_hash(values: dict) -> str:
    """Which configuration a checkpoint belongs to (keras-tuner bookkeeping left out)."""
    plain = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _floats(logs: dict | None) -> dict[str, float]:
    out = {}
    for k, v in (logs or {}).items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class _Abandon(Exception):
    """Stop training this trial (lease lost or search over); carries the cause."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class _Release(Exception):
    """Stop training this trial at a batch boundary: the worker was preempted (SIGTERM)."""


class Heartbeat:
    """While a trial runs, a thread renews its lease every ``interval_s``.

    Epoch reports renew the lease too, but an epoch, the first graph trace or a
    checkpoint upload can take longer than the lease on a slow node; without
    this the chief would give a live worker's trial away. A dead worker sends
    nothing and loses its trial. Renewal stops once training has made no
    progress (:meth:`progress`: a batch or an epoch ended) for ``stall_s``, so a
    hung worker loses it too. Why the trial must stop (lease lost, search over)
    is kept in :attr:`lost`; the training thread raises it at its next batch
    (:meth:`check`).
    """

    def __init__(self, client, trial_id: str, worker: str, interval_s: float, stall_s: float):
        self.client, self.trial_id, self.worker = client, trial_id, worker
        self.interval_s, self.stall_s = interval_s, stall_s
        self.lost: BaseException | None = None
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"heartbeat-{trial_id}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def progress(self) -> None:
        self._last_progress = time.monotonic()

    def check(self) -> None:
        if self.lost is not None:
            raise _Abandon(self.lost)

    def _run(self) -> None:
        stalled = warned = False
        while not self._stop.wait(self.interval_s):
            idle = time.monotonic() - self._last_progress
            if idle > self.stall_s:
                if not stalled:
                    log.warning("%s: trial %s made no progress for %.0f s; no more heartbeats "
                                "(the chief will reclaim it)", self.worker, self.trial_id, idle)
                stalled = True
                continue
            stalled = False
            try:
                self.client.heartbeat(self.trial_id)
                warned = False
            except LeaseLostError as e:
                self.lost = e
                return
            except RetryableError as e:  # the chief is away (restarting?): keep training
                if not warned:
                    log.warning("%s: heartbeat for trial %s not delivered (%s); training on",
                                self.worker, self.trial_id, e)
                warned = True
            except Exception as e:  # noqa: BLE001 - SearchOver / SearchFailedError: stop
                if type(e).__name__ in ("SearchOver", "SearchFailedError"):
                    self.lost = e
                    return
                log.warning("%s: heartbeat for trial %s failed: %s: %s", self.worker,
                            self.trial_id, type(e).__name__, e)


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
        logs = _floats(logs)
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
            raise _Abandon(e) from None
        except RetryableError as e:  # the chief is away (restarting?): keep training
            log.warning("%s: could not report epoch %d of trial %s (%s); training on",
                        tuner.tuner_id, epoch + 1, trial_id, e)
        except Exception as e:  # SearchOver / SearchFailedError: stop now
            if type(e).__name__ in ("SearchOver", "SearchFailedError"):
                raise _Abandon(e) from None
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


class WorkerTuner(keras_tuner.Tuner):
    """Runs the chief's trials on this worker (see the module docstring)."""

    def __init__(self, *, local_oracle, client, hypermodel, storage, exp, tuner_id: str,
                 directory, metrics: WorkerHooks | None = None, images_per_epoch: int = 0, preemption=None,
                 watchdog=None, **kwargs):
        with stock_distribution_off():
            super().__init__(oracle=local_oracle, hypermodel=hypermodel, directory=str(directory),
                             project_name="trials", tuner_id=tuner_id, overwrite=True,
                             executions_per_trial=exp.search.executions_per_trial, **kwargs)
        self.oracle = client  # everything goes to the chief
        self.exp = exp
        self.heartbeat: Heartbeat | None = None  # the running trial's
        self.attempt = 1  # the running trial's attempt number (its files' folder)
        self.max_epochs = exp.search.max_epochs
        # not self.metrics: keras_tuner.Tuner uses that name for compile metrics
        self.hooks = metrics if metrics is not None else WorkerHooks()
        self.images_per_epoch = images_per_epoch
        self.files = TrialFiles(storage, exp.trials_uri, self.project_dir)
        self._stopped: dict[str, int] = {}  # trial id -> the epoch the chief stopped it at
        self.preemption = preemption  # skin.tuning.preempt.Preemption: SIGTERM = release
        self.watchdog = watchdog  # skin.tuning.watchdog.Watchdog: a hung trial ends the process
        self.running: tuple[str, dict] | None = None  # (trial id, epoch.json) while training
        self.running_trial = None  # the Trial from arming the watchdog to its disarming
        self.resumed_at = 0

    def _populate_initial_space(self):
        pass  # the chief owns the search space; trials arrive with it

    def save(self):
        pass  # nothing local is worth keeping: trial state lives in the bucket and the chief

    def load_model(self, trial):
        """keras-tuner's load_model, with the checkpoint fetched from the bucket first."""
        self.files.fetch(trial.trial_id, BEST_WEIGHTS)
        model = self._try_build(trial.hyperparameters)
        if not model.built:
            model.build_from_config(json.loads(
                self.files.fetch(trial.trial_id, BUILD_CONFIG).read_text()))
        load_weights(model, self.files.local(trial.trial_id, BEST_WEIGHTS))
        return model

    # -- the loop ---------------------------------------------------------------------

    def work(self, **fit_kwargs) -> int:
        """Run trials until the chief says the search is over; returns trials run.

        With a :class:`~skin.tuning.preempt.Preemption`, SIGTERM raises ``Preempted``
        between trials, and releases the trial in training at its next batch boundary.
        """
        idle, ran, waiting_since = IDLE_MIN_S, 0, None
        stop = self.preemption
        while True:
            if stop is not None:
                stop.check()
            # From the chief's answer to the trial's end, SIGTERM only asks: a trial is held.
            with stop.deferred() if stop is not None else contextlib.nullcontext():
                trial = self.oracle.create_trial(self.tuner_id)  # raises SearchOver at the end
                if trial.status == "RUNNING":
                    idle, waiting_since = IDLE_MIN_S, None
                    self.run_one(trial, **fit_kwargs)
                    ran += 1
                    continue
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info("%s: no trial to run yet (the search waits on running trials); "
                         "asking again with backoff up to %.0f s", self.tuner_id, IDLE_MAX_S)
            pause = idle * (1 + 0.2 * random.random())
            stop.wait(pause) if stop is not None else time.sleep(pause)
            idle = min(idle * 2, IDLE_MAX_S)

    def batch_boundary(self) -> None:
        """Between two batches: training moves; a SIGTERM stops the trial here."""
        if self.watchdog is not None:
            self.watchdog.progress()
        if self.preemption is not None and self.preemption.requested.is_set():
            raise _Release()

    def release_running(self) -> str:
        """Hand the trial in training back to the chief (preempted); ``released``.

        Its last finished epoch is in the bucket: each epoch uploads ``epoch.json`` before
        the next batch starts. Safe to call twice (the deadline thread may race the main one).
        """
        running = self.running
        if running is None:
            return "released"
        trial_id, state = running
        epochs = int(state.get("epoch", 0))
        try:
            self.oracle.release(trial_id, epochs, first_epoch=min(self.resumed_at, epochs))
            log.warning("trial %s released by %s after %d epochs (preempted); it resumes at "
                        "epoch %d on the next worker", trial_id, self.tuner_id, epochs,
                        epochs + 1)
        except LeaseLostError as e:
            log.warning("trial %s: not released by %s, the chief had already given it away "
                        "(%s)", trial_id, self.tuner_id, e)
        except Exception as e:  # noqa: BLE001 - the pod has seconds left: say it and go
            log.warning("trial %s: the release by %s did not reach the chief (%s: %s); it stays "
                        "leased to %s (a replacement with this id gets it back, else the lease "
                        "runs out)", trial_id, self.tuner_id, type(e).__name__, e,
                        self.tuner_id)
        self.hooks.trial_finished("released")
        return "released"

    def end_hung(self, reason: str) -> None:
        """The watchdog's last call (from its thread): end the hung trial as failed now."""
        trial = self.running_trial
        if trial is None:
            return
        trial.status, trial.message = "INVALID", reason
        self.oracle.end_trial(trial, watchdog=True, timeout_s=4.0)
        log.warning("trial %s: ended at the chief as failed by the watchdog", trial.trial_id)

    def run_one(self, trial, **fit_kwargs) -> str:
        """Train one trial and end it at the chief; returns its status."""
        trial_id, attempt = trial.trial_id, self.oracle.attempts.get(trial.trial_id, 0)
        self.attempt = max(1, int(attempt or 1))
        first, last = self._epochs(trial)
        log.info("trial %s started on %s (attempt %d, epochs %d->%d)%s", trial_id, self.tuner_id,
                 attempt, first, last, self._describe(trial))
        self.hooks.trial_started(last - first)
        t0 = time.monotonic()
        lease = self.exp.search.lease_seconds
        span = None
        if self.watchdog is not None:
            self.running_trial = trial
            self.watchdog.arm(f"trial {trial_id}")
        try:
            with Heartbeat(self.oracle, trial_id, self.tuner_id, interval_s=lease / 4,
                           stall_s=4 * lease) as self.heartbeat:
                try:
                    results, best_step = self.run_trial(trial, **fit_kwargs)
                    # a trial the chief stopped early finished its epochs up to that point
                    span = (self.resumed_at, self._stopped.get(trial_id, last))
                finally:
                    self.heartbeat = None
            metrics = tuner_utils.convert_to_metrics_dict(results, self.oracle.objective)
            tracker = trial.metrics
            for name, value in metrics.items():
                if not tracker.exists(name):
                    direction = self.oracle.objective.direction \
                        if name == self.oracle.objective.name else None
                    tracker.register(name, direction=direction)
                tracker.update(name, float(value), step=best_step)
            trial.status = "COMPLETED"
        except _Release:
            status = self.release_running()
            self.preemption.check()  # leave: exit EXIT_RELEASED
            return status
        except _Abandon as e:
            if isinstance(e.cause, LeaseLostError):
                log.warning("trial %s on %s: the chief gave it to another worker (%s); dropping "
                            "it", trial_id, self.tuner_id, e.cause)
                self.hooks.trial_finished("reclaimed")
                return "reclaimed"
            raise e.cause from None
        except RetryableError:
            raise  # the bucket is away: exit 75, come back with the same id, resume
        except Exception as e:  # noqa: BLE001 - the trial failed; the chief decides on retries
            # keras-tuner's FailedTrialError (and FatalError: a hypermodel that cannot work) are
            # not retried; the chief's consecutive-failure rule stops a broken search everywhere.
            trial.status = "FAILED" if isinstance(
                e, (kt_errors.FailedTrialError, kt_errors.FatalError)) else "INVALID"
            trial.message = traceback.format_exc()
            log.warning("trial %s failed on %s: %s: %s", trial_id, self.tuner_id,
                        type(e).__name__, e)
            # A retry starts afresh, not from bad weights.
            self.files.drop_epoch_state(trial_id, self.attempt)
        finally:
            self.running = None
            if self.watchdog is not None:
                self.watchdog.disarm()
                self.running_trial = None
        try:
            self.oracle.end_trial(trial, epochs=span)
        except LeaseLostError as e:
            log.warning("trial %s on %s: ended too late, the chief had reclaimed it (%s)",
                        trial_id, self.tuner_id, e)
            self.hooks.trial_finished("reclaimed")
            return "reclaimed"
        seconds = time.monotonic() - t0
        status = trial.status.lower()
        if trial.status == "COMPLETED":
            name = self.oracle.objective.name
            stopped = self._stopped.pop(trial_id, None)
            log.info("trial %s completed on %s: %s=%.4f after %d epochs in %.1f s%s", trial_id,
                     self.tuner_id, name, trial.metrics.get_best_value(name), stopped or last,
                     seconds, " (stopped early)" if stopped else "")
        self.hooks.trial_finished(status)
        return status

    def _epochs(self, trial) -> tuple[int, int]:
        values = trial.hyperparameters.values
        return (int(values.get("tuner/initial_epoch", 0)),
                int(values.get("tuner/epochs", self.max_epochs)))

    @staticmethod
    def _describe(trial) -> str:
        past = trial.hyperparameters.values.get("tuner/trial_id")
        return f", continuing trial {past}" if past else ""

    # -- one trial -------------------------------------------------------------------

    def run_trial(self, trial, *args, **kwargs):
        """Train ``executions_per_trial`` models; ([best-epoch metrics per execution], step)."""
        hp = trial.hyperparameters
        trial_id = trial.trial_id
        first, last = self._epochs(trial)
        past_id = hp.values.get("tuner/trial_id")
        state, source = self.files.resume_state(trial_id, self.attempt,
                                                values_hash(hp.values), first, last,
                                                self.tuner_id)
        self.running = (trial_id, state)
        self.resumed_at = int(state["attempt_first"])  # where this attempt took the trial up
        self.batch_boundary()  # SIGTERM before the first batch: release at once
        user_callbacks = kwargs.pop("callbacks", [])
        objective = self.oracle.objective
        for execution in range(state["execution"], self.executions_per_trial):
            if execution != state["execution"]:
                state.update(execution=execution, epoch=first, history=[])
            model = self._try_build(hp)
            start = first
            if state["epoch"] > first and state["history"]:
                load_weights(model, self.files.fetch(trial_id, EPOCH_WEIGHTS, source))
                start = state["epoch"]
                log.info("trial %s: resuming execution %d at epoch %d from the bucket (attempt "
                         "%d's files)", trial_id, execution + 1, start + 1, source)
            elif past_id:
                path = self.files.fetch(past_id, BEST_WEIGHTS)
                if not model.built:
                    model.build_from_config(json.loads(
                        self.files.fetch(past_id, BUILD_CONFIG).read_text()))
                load_weights(model, path)
                log.info("trial %s: starting from the weights of trial %s (from the bucket)",
                         trial_id, past_id)
            callbacks = self._deepcopy_callbacks(user_callbacks)
            self._configure_tensorboard_dir(callbacks, trial, execution)
            callbacks.append(EpochReporter(self, trial, execution, state))
            if start < last:
                fit_kwargs = copy.copy(kwargs)
                fit_kwargs.update(epochs=last, initial_epoch=start, callbacks=callbacks)
                self.hypermodel.fit(hp, model, *args, **fit_kwargs)
            best = self._best_epoch(state["history"], objective)
            state["done"].append(best)
            state["history"] = []
            if state.get("stopped"):  # stopped early: no more executions
                self._stopped[trial_id] = int(state["stopped"])
                break
        results = [{k: v for k, v in b.items() if k != "epoch"} for b in state["done"]]
        step = int(statistics.mean(b.get("epoch", 0) for b in state["done"])) \
            if state["done"] else 0
        return results, step

    @staticmethod
    def _best_epoch(history: list[dict], objective) -> dict:
        if not history:
            raise ValueError("the trial trained no epoch (no history to score)")
        scored = [h for h in history if objective.has_value(h)]
        if not scored:
            raise ValueError(f"the objective {objective.name!r} is not in the training logs "
                             f"(logged: {sorted(k for k in history[-1] if k != 'epoch')})")
        best = scored[0]
        for h in scored[1:]:
            if objective.better_than(objective.get_value(h), objective.get_value(best)):
                best = h
        return best
