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

The files and the epoch callback are :mod:`skin.tuning.checkpoints`.
Weights files hold the optimizer state too (Keras 3 ``save_weights``); it is
restored by building the optimizer before loading.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import statistics
import threading
import time
import traceback

import keras_tuner
from keras_tuner.src import errors as kt_errors
from keras_tuner.src.engine import tuner_utils

from skin.errors import RetryableError
from skin.infra.artifacts import (
    BEST_WEIGHTS,
    BUILD_CONFIG,
    EPOCH_WEIGHTS,
)
from skin.tuning.checkpoints import (
    Abandon,
    EpochReporter,
    TrialFiles,
    load_weights,
    values_hash,
)
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
            raise Abandon(self.lost)

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


class WorkerTuner(keras_tuner.Tuner):
    """Runs the chief's trials on this worker (see the module docstring)."""

    def __init__(self, *, local_oracle, client, hypermodel, storage, exp, tuner_id: str,
                 directory, metrics: WorkerHooks | None = None, images_per_epoch: int = 0,
                 preemption=None, watchdog=None, **kwargs):
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
        except Abandon as e:
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
