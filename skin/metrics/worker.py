"""A worker's Prometheus metrics (``skin_worker_*``): the
:class:`~skin.tuning.hooks.WorkerHooks` with series. Shared parts: skin.metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from skin.metrics import (
    EPOCH_DURATION_BUCKETS,
    NAN,
    TRIAL_END_STATUSES,
    Warnings,
    build_info,
    finite,
    status_label,
)
from skin.tuning.hooks import WorkerHooks


class WorkerMetrics(WorkerHooks):
    """One worker's metrics; every series carries ``worker`` (its ``tuner<i>`` id)."""

    def __init__(self, registry: CollectorRegistry, worker: str, *,
                 objective: str = "val_auc") -> None:
        self.registry = registry
        self.worker = worker
        self.objective = objective
        self._warn = Warnings()
        self._epochs_in_trial = 0
        r = registry
        build_info(r, "worker")
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
        seconds = finite(seconds)
        ips = finite(images_per_second)
        if seconds is not None and seconds >= 0:
            self._epoch_duration.observe(seconds)
        if ips is not None and ips >= 0:
            self._ips.set(ips)
            if seconds is not None and seconds >= 0:
                self._images.inc(ips * seconds)
        logs = logs or {}
        for key, gauge in (("loss", self._train_loss), ("val_loss", self._val_loss),
                           (self.objective, self._objective)):
            value = finite(logs.get(key))
            if value is not None:
                gauge.set(value)

    def trial_finished(self, status: str) -> None:
        self._running.set(0)
        self._ended.labels(self.worker, status_label(status, TRIAL_END_STATUSES, self._warn)).inc()

    def data_synced(self, nbytes: int, seconds: float) -> None:
        if nbytes and nbytes > 0:
            self._sync_bytes.inc(nbytes)
        seconds = finite(seconds)
        if seconds is not None and seconds > 0:
            self._sync_seconds.inc(seconds)
