"""Prometheus metrics of every role, each on an explicit registry.

Three hook objects, one per kind of process:

- :class:`ChiefMetrics`: the search as the oracle sees it (trials by status,
  best objective, workers' last reports, oracle calls, progress and time left);
- :class:`WorkerMetrics`: one worker's current trial (epoch of budget, losses,
  objective, throughput), trials it finished, its data sync;
- :class:`BatchMetrics`: the batch jobs (``stage``, ``retrain``): counts,
  durations, the final model's metrics, last success; pushed to a Pushgateway
  when one is configured, logged otherwise.

Names follow the Prometheus conventions (``skin_`` prefix, base units,
``_total`` counters, ``_timestamp_seconds`` points in time, ``_info``
metadata). Labels are low-cardinality only (``role``, ``status``,
``worker``, ``method``, ``split``): never a trial id or a hyperparameter value.
Known label sets are created up front so they read 0 from the first scrape.

The hooks never raise on odd input (a metric must not end a trial): a bad
value is logged once and skipped. See docs/observability.md for the metric
list, the dashboard and the alerts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import platform
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from skin import __version__
from skin.artifacts import objective_direction
from skin.tuning.hooks import ChiefHooks, WorkerHooks

log = logging.getLogger("skin.metrics")

# `_created` series double every counter and histogram for no use on our dashboards.
prometheus_client.disable_created_metrics()

NAN = float("nan")

# Statuses a trial ends with (the chief's view; workers use the same words).
TRIAL_END_STATUSES = ("completed", "failed", "invalid", "reclaimed", "released")
TRIAL_STATUSES = ("running",) + TRIAL_END_STATUSES

# keras-tuner's oracle RPCs (keras_tuner/protos/service.proto) plus our lease renewal;
# other method names are accepted as they come (the set is fixed by the code, not by data).
ORACLE_METHODS = ("GetSpace", "UpdateSpace", "CreateTrial", "UpdateTrial", "EndTrial",
                  "GetTrial", "GetBestTrials")
# Why the chief refused an oracle call (skin.tuning.auth, skin.tuning.oracle); "other" is a guard.
ORACLE_REFUSAL_REASONS = ("unauthenticated", "identity", "not_holder", "report", "hyperparameters",
                          "space", "other")

# Trials last minutes to hours (seconds in local runs).
TRIAL_DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800,
                          57600)
# An epoch: seconds on a GPU with small images, up to an hour on a CPU with big ones.
EPOCH_DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# An oracle RPC: milliseconds, seconds when the chief persists state to a slow bucket.
ORACLE_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0)

BATCH_JOBS = ("stage", "retrain")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _package_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _build_info(registry: CollectorRegistry, role: str) -> Info:
    info = Info("skin_build", "Build of the running skin process (value is always 1).",
                registry=registry)
    info.info({
        "role": role,
        "version": __version__,
        "python_version": platform.python_version(),
        "keras_tuner_version": _package_version("keras-tuner"),
        "tensorflow_version": _package_version("tensorflow", "tensorflow-cpu"),
    })
    return info


class _Warnings:
    """Log each distinct problem once: a hook called every epoch must not flood the log."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def once(self, message: str, *args) -> None:
        key = message % args
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        log.warning(message, *args)


def _status(value: str, known: tuple[str, ...], warn: _Warnings) -> str:
    status = str(value).strip().lower()
    if status not in known:
        warn.once("metrics: unknown trial status %r (expected one of %s); counted as given",
                  value, ", ".join(known))
    return status


# ---------------------------------------------------------------------------
# Chief


@dataclass
class _WorkerSeen:
    last_report: float
    running: int = 0


class ChiefMetrics(ChiefHooks):
    """The chief's (oracle's) metrics. Thread-safe: the gRPC servicer calls it from many threads.

    ``objective``/``direction`` decide what "best" means (``direction`` defaults to
    :func:`objective_direction`); ``workers`` creates each ``tuner<i>``'s series up front;
    ``lease_seconds`` is how recent a report must be for a worker to count as connected.
    """

    def __init__(self, registry: CollectorRegistry, *, objective: str = "val_auc",
                 direction: str | None = None, workers: int = 0, lease_seconds: float = 300.0,
                 experiment: str = "", tuner: str = "") -> None:
        self.registry = registry
        self.objective = objective
        self.direction = direction or objective_direction(objective)
        if self.direction not in ("min", "max"):
            raise ValueError(f"direction: {direction!r} is not valid; expected 'min' or 'max'")
        self.lease_seconds = float(lease_seconds)
        self._lock = threading.Lock()
        self._warn = _Warnings()
        self._workers: dict[str, _WorkerSeen] = {}
        self._best: float | None = None
        self._running_count = 0
        self._ended_durations: list[float] = []  # completed trials, for the time-left estimate

        r = registry
        _build_info(r, "chief")
        Info("skin_chief_search", "What the search optimises (value is always 1).",
             registry=r).info({"experiment": experiment, "tuner": tuner, "objective": objective,
                               "direction": self.direction})
        ProcessCollector(registry=r)

        self._running = Gauge("skin_chief_trials_running", "Trials handed out and not yet ended.",
                              registry=r)
        self._started = Counter("skin_chief_trials_started", "Trials handed to a worker.",
                                registry=r)
        self._ended = Counter("skin_chief_trials_ended",
                              "Trial attempts ended, by status (completed, failed, invalid: "
                              "failed and re-queued, reclaimed: taken back from a worker that "
                              "stopped reporting, released: handed back by a preempted worker "
                              "and re-queued, not a failure).",
                              ["status"], registry=r)
        self._duration = Histogram("skin_chief_trial_duration_seconds",
                                   "Wall time of ended trials, by status.", ["status"],
                                   buckets=TRIAL_DURATION_BUCKETS, registry=r)
        for status in TRIAL_END_STATUSES:
            self._ended.labels(status)
            self._duration.labels(status)

        self._stopped_early = Counter("skin_chief_trials_stopped_early",
                                      "Trials the early-stopping rule ended before their last "
                                      "epoch (search.early_stopping); they also count as "
                                      "completed in skin_chief_trials_ended.", registry=r)
        self._confirmations = Counter("skin_chief_confirmation_trials_started",
                                      "Confirmation trials handed out (search.confirm).",
                                      registry=r)
        self._best_objective = Gauge("skin_chief_best_objective",
                                     "Best score of a completed trial so far (NaN before one).",
                                     registry=r)
        self._best_objective.set(NAN)
        self._best_trial = Gauge("skin_chief_best_trial_number",
                                 "keras-tuner's numeric trial id of the best trial (NaN when "
                                 "unknown); a value, never a label.", registry=r)
        self._best_trial.set(NAN)
        self._improved = Gauge("skin_chief_best_objective_improved_timestamp_seconds",
                               "When the best objective last improved (0 before it was set).",
                               registry=r)
        self._progress = Gauge("skin_chief_last_progress_timestamp_seconds",
                               "Last time a trial started or ended or a worker reported an "
                               "epoch.", registry=r)
        self._progress.set(time.time())

        self._expected = Gauge("skin_chief_workers_expected", "Workers the experiment asks for.",
                               registry=r)
        self._expected.set(workers)
        self._connected = Gauge("skin_chief_workers_connected",
                                "Workers that reported within the lease (search.lease_seconds).",
                                registry=r)
        self._connected.set_function(self._count_connected)
        self._last_report = Gauge("skin_chief_worker_last_report_timestamp_seconds",
                                  "When each worker last reported (any call from it).",
                                  ["worker"], registry=r)
        self._reports = Counter("skin_chief_worker_reports", "Calls from each worker.",
                                ["worker"], registry=r)
        self._worker_running = Gauge("skin_chief_worker_trials_running",
                                     "Trials running on each worker (0 or 1).", ["worker"],
                                     registry=r)
        self._worker_epoch = Gauge("skin_chief_worker_trial_epoch",
                                   "Epochs done of each worker's current trial, as reported.",
                                   ["worker"], registry=r)
        self._worker_budget = Gauge("skin_chief_worker_trial_epochs_budget",
                                    "Epoch budget of each worker's current trial, as reported.",
                                    ["worker"], registry=r)
        self._watchdog_exits = Counter("skin_chief_worker_watchdog_exits",
                                       "Workers whose watchdog ended a hung trial and exited "
                                       "(no finished batch for search.watchdog_leases leases).",
                                       ["worker"], registry=r)
        for i in range(workers):
            self._init_worker(f"tuner{i}")

        self._oracle_calls = Counter("skin_chief_oracle_calls", "Oracle RPCs served, by method.",
                                     ["method"], registry=r)
        self._oracle_latency = Histogram("skin_chief_oracle_call_duration_seconds",
                                         "Time the oracle took to answer, by method.", ["method"],
                                         buckets=ORACLE_LATENCY_BUCKETS, registry=r)
        for method in ORACLE_METHODS:
            self._oracle_calls.labels(method)
            self._oracle_latency.labels(method)
        self._refused = Counter("skin_oracle_refused_calls",
                                "Oracle calls refused, by reason: unauthenticated (no or wrong "
                                "token), identity (worker id or attempt missing or not this "
                                "experiment's), not_holder (the caller does not hold the trial), "
                                "report (metrics not finite, out of range, objective missing), "
                                "hyperparameters (not the ones the chief issued), space "
                                "(UpdateSpace that is not the chief's space).",
                                ["reason"], registry=r)
        for reason in ORACLE_REFUSAL_REASONS:
            self._refused.labels(reason)

        self._done = Gauge("skin_chief_search_trials_done",
                           "Trials the search counts as done.", registry=r)
        self._total = Gauge("skin_chief_search_trials_estimated",
                            "The tuner's estimate of the trials the whole search runs (NaN when "
                            "unknown).", registry=r)
        self._total.set(NAN)
        self._eta = Gauge("skin_chief_search_eta_seconds",
                          "Estimated time left when last computed (NaN when unknown).",
                          registry=r)
        self._eta.set(NAN)
        self._end = Gauge("skin_chief_search_estimated_end_timestamp_seconds",
                          "Estimated end of the search (time left = this - time()).", registry=r)
        self._end.set(NAN)
        self._finished = Gauge("skin_chief_search_finished",
                               "1 once the search has ended (no more trials).", registry=r)
        self._finished_at = Gauge("skin_chief_search_finished_timestamp_seconds",
                                  "When the search ended (0 while it runs).", registry=r)
        self._lock_held = Gauge("skin_chief_lock_held",
                                "1 while this chief holds the search's lock in the bucket (0 "
                                "while it waits for another chief's to expire).", registry=r)
        self._lock_lost = Gauge("skin_chief_lock_lost",
                                "1 once this chief lost its lock to another chief: it stopped "
                                "serving and exits 6 without writing.", registry=r)
        self._preconditions = Counter("skin_chief_precondition_failures",
                                      "Conditional writes of the chief's state (lock, journal, "
                                      "compaction, header, result) that found the object "
                                      "changed by another writer.", ["kind"], registry=r)
        for kind in ("lock", "journal", "compaction", "header", "result"):
            self._preconditions.labels(kind)

    # -- helpers

    def _init_worker(self, worker: str) -> None:
        self._reports.labels(worker)
        self._watchdog_exits.labels(worker)
        self._worker_running.labels(worker)

    def _count_connected(self) -> int:
        cutoff = time.time() - self.lease_seconds
        with self._lock:
            return sum(1 for w in self._workers.values() if w.last_report >= cutoff)

    def _seen(self, worker: str, now: float, report: bool = True) -> _WorkerSeen:
        """The worker's record; ``report``: this is a call from it (caller holds the lock)."""
        seen = self._workers.get(worker)
        if seen is None:
            seen = self._workers[worker] = _WorkerSeen(now if report else 0.0)
            self._init_worker(worker)
        if report:
            seen.last_report = now
            self._reports.labels(worker).inc()
            self._last_report.labels(worker).set(now)
        return seen

    # -- hooks (ARCHITECTURE.md)

    def trial_started(self, worker: str) -> None:
        now = time.time()
        with self._lock:
            seen = self._seen(worker, now)
            seen.running += 1
            self._worker_running.labels(worker).set(seen.running)
            self._worker_epoch.labels(worker).set(0)
            self._running_count += 1
            self._running.set(self._running_count)
            self._started.inc()
            self._progress.set(now)

    def trial_ended(self, status: str, duration_s: float, score: float | None, worker: str,
                    trial_id: str | None = None) -> None:
        """A trial ended. ``score`` counts toward the best only for a completed trial;
        ``trial_id`` (optional) is kept as a number when it is one (keras-tuner's ids are)."""
        status = _status(status, TRIAL_END_STATUSES, self._warn)
        now = time.time()
        duration = _finite(duration_s)
        score = _finite(score)
        with self._lock:
            # A reclaimed trial is the chief's decision about a silent worker, not a report.
            seen = self._seen(worker, now, report=status != "reclaimed")
            seen.running = max(0, seen.running - 1)
            self._worker_running.labels(worker).set(seen.running)
            self._running_count = max(0, self._running_count - 1)
            self._running.set(self._running_count)
            self._ended.labels(status).inc()
            if duration is not None and duration >= 0:
                self._duration.labels(status).observe(duration)
                if status == "completed":
                    self._ended_durations.append(duration)
            self._progress.set(now)
            if status == "completed" and score is not None and self._better(score):
                self._best = score
                self._best_objective.set(score)
                self._improved.set(now)
                number = str(trial_id).strip() if trial_id is not None else ""
                self._best_trial.set(int(number) if number.isdigit() else NAN)

    def trial_stopped_early(self) -> None:
        self._stopped_early.inc()

    def confirmation_started(self) -> None:
        self._confirmations.inc()

    def _better(self, score: float) -> bool:
        if self._best is None:
            return True
        return score > self._best if self.direction == "max" else score < self._best

    def worker_report(self, worker: str, epoch: int | None = None,
                      epochs_budget: int | None = None) -> None:
        """Any call from a worker (a lease renewal). With ``epoch`` (epochs done in its trial)
        it also counts as progress and feeds the per-worker epoch series."""
        now = time.time()
        with self._lock:
            self._seen(worker, now)
            if epoch is not None:
                self._worker_epoch.labels(worker).set(epoch)
                self._progress.set(now)
            if epochs_budget is not None:
                self._worker_budget.labels(worker).set(epochs_budget)

    def oracle_refused(self, reason: str) -> None:
        self._refused.labels(reason if reason in ORACLE_REFUSAL_REASONS else "other").inc()

    def worker_watchdog_exit(self, worker: str) -> None:
        """A worker's watchdog ended its hung trial; the worker process exits next."""
        with self._lock:
            self._seen(worker, time.time())
            self._watchdog_exits.labels(worker).inc()

    def oracle_call(self, method: str, seconds: float) -> None:
        self._oracle_calls.labels(method).inc()
        seconds = _finite(seconds)
        if seconds is not None and seconds >= 0:
            self._oracle_latency.labels(method).observe(seconds)

    @contextlib.contextmanager
    def timed_oracle_call(self, method: str) -> Iterator[None]:
        """``with metrics.timed_oracle_call("CreateTrial"): ...`` (counted even when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.oracle_call(method, time.perf_counter() - t0)

    def set_search_progress(self, done: int, total_estimate: int | None,
                            eta_seconds: float | None) -> None:
        """Trials done of the estimated total. Without ``eta_seconds`` the time left is
        estimated here: trials left x mean completed-trial time / connected workers."""
        now = time.time()
        total = _finite(total_estimate)
        self._done.set(done)
        self._total.set(NAN if total is None else total)
        eta = _finite(eta_seconds)
        if eta is None and total is not None:
            with self._lock:
                durations = list(self._ended_durations)
            if durations:
                parallel = max(1, self._count_connected())
                eta = max(0.0, total - done) * (sum(durations) / len(durations)) / parallel
        if eta is None:
            self._eta.set(NAN)
            self._end.set(NAN)
        else:
            eta = max(0.0, eta)
            self._eta.set(eta)
            self._end.set(now + eta)

    def search_finished(self) -> None:
        now = time.time()
        self._finished.set(1)
        self._finished_at.set(now)
        self._eta.set(0)
        self._end.set(now)
        self._progress.set(now)

    def chief_lock(self, held: bool, lost: bool = False) -> None:
        self._lock_held.set(1 if held else 0)
        if lost:
            self._lock_lost.set(1)

    def precondition_failed(self, kind: str) -> None:
        self._preconditions.labels(kind).inc()

    @property
    def best(self) -> float | None:
        return self._best


# ---------------------------------------------------------------------------
# Worker


class WorkerMetrics(WorkerHooks):
    """One worker's metrics; every series carries ``worker`` (its ``tuner<i>`` id)."""

    def __init__(self, registry: CollectorRegistry, worker: str, *,
                 objective: str = "val_auc") -> None:
        self.registry = registry
        self.worker = worker
        self.objective = objective
        self._warn = _Warnings()
        self._epochs_in_trial = 0
        r = registry
        _build_info(r, "worker")
        ProcessCollector(registry=r)
        w = ["worker"]

        def gauge(name: str, doc: str, labels=()) -> Gauge:
            return Gauge(name, doc, w + list(labels), registry=r)

        self._running = gauge("skin_worker_trial_running", "1 while a trial trains.").labels(worker)
        self._trial_started = gauge("skin_worker_trial_started_timestamp_seconds",
                                    "When the current (or last) trial started.").labels(worker)
        self._epoch = gauge("skin_worker_trial_epoch",
                            "Epochs done of the current trial.").labels(worker)
        self._budget = gauge("skin_worker_trial_epochs_budget",
                             "Epochs the current trial may train (Hyperband's budget).")\
            .labels(worker)
        self._epochs = Counter("skin_worker_epochs", "Epochs trained.", w,
                               registry=r).labels(worker)
        self._epoch_duration = Histogram("skin_worker_epoch_duration_seconds",
                                         "Wall time of one training epoch (with validation).", w,
                                         buckets=EPOCH_DURATION_BUCKETS, registry=r).labels(worker)
        self._ips = gauge("skin_worker_images_per_second",
                          "Training images per second in the last epoch.").labels(worker)
        self._images = Counter("skin_worker_train_images", "Training images seen.", w,
                               registry=r).labels(worker)
        loss = gauge("skin_worker_epoch_loss", "Loss after the last epoch, by split "
                                               "(train, validation).", ["split"])
        self._train_loss = loss.labels(worker, "train")
        self._val_loss = loss.labels(worker, "validation")
        self._train_loss.set(NAN)
        self._val_loss.set(NAN)
        self._objective = gauge("skin_worker_epoch_objective",
                                "The search objective after the last epoch.").labels(worker)
        self._objective.set(NAN)
        self._ended = Counter("skin_worker_trials_ended", "Trials this worker finished, by status.",
                              w + ["status"], registry=r)
        for status in TRIAL_END_STATUSES:
            self._ended.labels(worker, status)
        self._sync_bytes = Counter("skin_worker_data_synced_bytes",
                                   "Bytes of staged data copied to local disk.", w,
                                   registry=r).labels(worker)
        self._sync_seconds = Counter("skin_worker_data_sync_seconds",
                                     "Time spent copying staged data to local disk.", w,
                                     registry=r).labels(worker)

    def trial_started(self, epochs_budget: int) -> None:
        self._running.set(1)
        self._trial_started.set(time.time())
        self._epochs_in_trial = 0
        self._epoch.set(0)
        self._budget.set(epochs_budget)
        self._train_loss.set(NAN)
        self._val_loss.set(NAN)
        self._objective.set(NAN)

    def epoch_ended(self, epoch: int, seconds: float, images_per_second: float,
                    logs: Mapping[str, float] | None) -> None:
        """``epoch``: Keras' index of the epoch that ended (informational: a Hyperband trial
        that continues another starts at its initial epoch, so the epochs-done gauge counts
        the epochs since :meth:`trial_started`, which is what its budget counts);
        ``logs``: Keras' epoch logs (``loss``, ``val_loss``, the objective)."""
        self._epochs_in_trial += 1
        self._epoch.set(self._epochs_in_trial)
        self._epochs.inc()
        seconds = _finite(seconds)
        ips = _finite(images_per_second)
        if seconds is not None and seconds >= 0:
            self._epoch_duration.observe(seconds)
        if ips is not None and ips >= 0:
            self._ips.set(ips)
            if seconds is not None and seconds >= 0:
                self._images.inc(ips * seconds)
        logs = logs or {}
        for key, gauge in (("loss", self._train_loss), ("val_loss", self._val_loss),
                           (self.objective, self._objective)):
            value = _finite(logs.get(key))
            if value is not None:
                gauge.set(value)

    def trial_finished(self, status: str) -> None:
        self._running.set(0)
        self._ended.labels(self.worker, _status(status, TRIAL_END_STATUSES, self._warn)).inc()

    def data_synced(self, nbytes: int, seconds: float) -> None:
        if nbytes and nbytes > 0:
            self._sync_bytes.inc(nbytes)
        seconds = _finite(seconds)
        if seconds is not None and seconds > 0:
            self._sync_seconds.inc(seconds)


# ---------------------------------------------------------------------------
# Batch jobs (stage, retrain)


class BatchMetrics:
    """A batch job's metrics (``skin_<job>_*``), pushed once at its end.

    The Prometheus docs' batch-job pattern: the last run's duration and the
    time of the last success (alert on its age), plus the job's counts and,
    for the retrain, the published model's metrics.

        batch = BatchMetrics(registry, "stage", experiment=exp.name)
        with batch.run():
            with batch.phase("shard"):
                ...
            batch.set_count("train", 1800)
        batch.push(runtime.pushgateway)
    """

    def __init__(self, registry: CollectorRegistry, job: str, *, experiment: str = "") -> None:
        if not _NAME_RE.match(job):
            raise ValueError(f"job: {job!r} is not valid; expected a metric-name word such as "
                             f"{' or '.join(BATCH_JOBS)}")
        self.registry = registry
        self.job = job
        self.experiment = experiment
        r = registry
        p = f"skin_{job}"
        _build_info(r, job)
        self._duration = Gauge(f"{p}_duration_seconds", f"Wall time of the last {job} run.",
                               registry=r)
        self._phases = Gauge(f"{p}_phase_duration_seconds",
                             f"Wall time of each phase of the last {job} run.", ["phase"],
                             registry=r)
        self._last_success = Gauge(f"{p}_last_success_timestamp_seconds",
                                   f"When {job} last finished successfully (0: never, here).",
                                   registry=r)
        self._last_failure = Gauge(f"{p}_last_failure_timestamp_seconds",
                                   f"When {job} last failed (0: never, here).", registry=r)
        self._counts = Gauge(f"{p}_items", f"Counts of the last {job} run, by kind (images per "
                                           "split, duplicates, quarantined files, epochs ...).",
                             ["kind"], registry=r)
        self._model = Gauge(f"{p}_model_metric", "Metrics of the model the run published "
                                                 "(auc, accuracy, sensitivity ...).", ["metric"],
                            registry=r)
        self._values: dict[str, float] = {}

    def set_count(self, kind: str, value: float) -> None:
        value = _finite(value)
        if value is not None:
            self._counts.labels(kind).set(value)
            self._values[f"items.{kind}"] = value

    def set_model_metrics(self, metrics: Mapping[str, object]) -> None:
        """Every finite number in ``metrics`` (lists, strings and nested values are skipped)."""
        for name, value in metrics.items():
            if isinstance(value, bool):
                continue
            value = _finite(value) if isinstance(value, (int, float)) else None
            if value is not None and _NAME_RE.match(str(name)):
                self._model.labels(name).set(value)
                self._values[f"model.{name}"] = value

    def set_phase_duration(self, phase: str, seconds: float) -> None:
        self._phases.labels(phase).set(seconds)
        self._values[f"phase.{phase}_seconds"] = seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.set_phase_duration(name, time.perf_counter() - t0)

    def succeeded(self, duration_s: float) -> None:
        self._duration.set(duration_s)
        self._last_success.set(time.time())
        self._values["duration_seconds"] = duration_s

    def failed(self, duration_s: float) -> None:
        self._duration.set(duration_s)
        self._last_failure.set(time.time())
        self._values["duration_seconds"] = duration_s

    @contextlib.contextmanager
    def run(self) -> Iterator[BatchMetrics]:
        """Time the block; success or failure (the exception propagates)."""
        t0 = time.perf_counter()
        try:
            yield self
        except BaseException:
            self.failed(time.perf_counter() - t0)
            raise
        self.succeeded(time.perf_counter() - t0)

    def summary(self) -> str:
        """One line with every value set, for the log when there is no Pushgateway."""
        values = " ".join(f"{k}={v:g}" for k, v in sorted(self._values.items()))
        return f"skin_{self.job} metrics: {values or '(none)'}"

    def push(self, gateway: str | None, *, timeout: float = 10.0) -> bool:
        """Push to the Pushgateway (``host:port`` or a URL) under job ``skin-<job>`` (grouped by
        experiment); without a gateway, log :meth:`summary`. A failed push is logged, not
        raised: the job's work is done. True when pushed."""
        if not gateway:
            log.info("%s", self.summary())
            return False
        grouping = {"experiment": self.experiment} if self.experiment else None
        try:
            prometheus_client.push_to_gateway(gateway, job=f"skin-{self.job}",
                                              registry=self.registry, grouping_key=grouping,
                                              timeout=timeout)
        except OSError as e:
            log.warning("could not push %s metrics to %s: %s; %s", self.job, gateway, e,
                        self.summary())
            return False
        log.info("pushed %s metrics to %s", self.job, gateway)
        return True


def role_metrics(registry: CollectorRegistry, exp, tuner_id: str) -> ChiefMetrics | WorkerMetrics:
    """The hooks of a tuning role (``chief`` or ``tuner<i>``), configured from the experiment:
    objective and direction, the workers to expect, the lease that counts as connected."""
    if tuner_id == "chief":
        return ChiefMetrics(registry, objective=exp.search.objective,
                            direction=exp.search.direction, workers=exp.workers,
                            lease_seconds=exp.search.lease_seconds, experiment=exp.name,
                            tuner=exp.search.tuner)
    return WorkerMetrics(registry, tuner_id, objective=exp.search.objective)


# ---------------------------------------------------------------------------
# Serving


class _ScrapeWatch:
    """Notes when scrapes start and end; exposes nothing itself.

    Two marker collectors (:meth:`marker`) go around the served metrics: the start
    marker is collected first in a scrape, the end marker last.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.starts = self.scrapes = 0  # scrapes: the ones whose collection finished
        self.last_scrape: float | None = None

    def marker(self, end: bool) -> _ScrapeMark:
        return _ScrapeMark(self, end)

    def _note(self, end: bool) -> None:
        with self._cond:
            if end:
                self.scrapes += 1
                self.last_scrape = time.time()
                self._cond.notify_all()
            else:
                self.starts += 1

    def wait(self, timeout: float) -> bool:
        """Until a scrape that started after this call has collected everything."""
        with self._cond:
            wanted = self.starts + 1  # scrapes are serial per scraper: the next one to start
            seen = self._cond.wait_for(lambda: self.scrapes >= wanted, timeout=timeout)
        if seen:
            time.sleep(0.1)  # let the HTTP server send the body before the caller exits
        return seen


class _ScrapeMark:
    def __init__(self, watch: _ScrapeWatch, end: bool) -> None:
        self.watch, self.end = watch, end

    def describe(self):  # keeps registration from calling collect()
        return []

    def collect(self):
        self.watch._note(self.end)
        return []


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint (prometheus_client's HTTP server in a daemon thread)."""

    host: str
    port: int
    _server: object = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _watch: _ScrapeWatch = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def scrapes(self) -> int:
        return self._watch.scrapes

    def wait_for_scrape(self, timeout: float) -> bool:
        """Block until the next scrape (or ``timeout``): call before a role exits so the
        final values (search finished, last trial) reach Prometheus. True if scraped."""
        return self._watch.wait(timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Delegate:
    """A collector that yields everything ``registry`` holds at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def describe(self):
        return []

    def collect(self):
        return self.registry.collect()


def serve(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics``; port 0 picks a free one
    (``.port`` is the bound port).

    Markers around ``registry`` note when each scrape starts and ends, so
    :meth:`MetricsServer.wait_for_scrape` returns once a scrape that *started* after
    the call has read the role's metrics: a role's last counter increments reach
    Prometheus before it exits (a scrape already under way may have read them earlier).
    """
    watch = _ScrapeWatch()
    served = CollectorRegistry(auto_describe=False)
    served.register(watch.marker(end=False))
    served.register(_Delegate(registry))
    served.register(watch.marker(end=True))
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=served)
    return MetricsServer(host, server.server_port, server, thread, watch)
