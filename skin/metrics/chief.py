"""The chief's Prometheus metrics (``skin_chief_*``, ``skin_oracle_*``): the
:class:`~skin.tuning.hooks.ChiefHooks` with series. Shared parts: skin.metrics."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from skin.infra.artifacts import objective_direction
from skin.metrics import (
    NAN,
    ORACLE_LATENCY_BUCKETS,
    ORACLE_METHODS,
    ORACLE_REFUSAL_REASONS,
    TRIAL_DURATION_BUCKETS,
    TRIAL_END_STATUSES,
    Warnings,
    build_info,
    finite,
    status_label,
)
from skin.tuning.hooks import ChiefHooks


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
        self._warn = Warnings()
        self._workers: dict[str, _WorkerSeen] = {}
        self._best: float | None = None
        self._running_count = 0
        self._ended_durations: list[float] = []  # completed trials, for the time-left estimate

        r = registry
        build_info(r, "chief")
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
        status = status_label(status, TRIAL_END_STATUSES, self._warn)
        now = time.time()
        duration = finite(duration_s)
        score = finite(score)
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
        seconds = finite(seconds)
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
        total = finite(total_estimate)
        self._done.set(done)
        self._total.set(NAN if total is None else total)
        eta = finite(eta_seconds)
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
