"""Prometheus metrics of every role, each on an explicit registry: what they share.

One hook object per kind of process, each in its own module:

- ``skin.metrics.chief.ChiefMetrics``: the search as the oracle sees it (trials by
  status, best objective, workers' last reports, oracle calls, progress and time left);
- ``skin.metrics.worker.WorkerMetrics``: one worker's current trial (epoch of budget,
  losses, objective, throughput), trials it finished, its data sync;
- ``skin.metrics.batch.BatchMetrics``: the batch jobs (``stage``, ``retrain``):
  counts, durations, the final model's metrics, last success; pushed to a Pushgateway
  when one is configured, logged otherwise;

and ``skin.metrics.server`` (``role_metrics``: a tuning role's hooks from the
experiment; ``serve``: the ``/metrics`` endpoint). This module holds the label sets,
buckets and value checks they share.

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

import importlib.metadata
import logging
import math
import platform
import re
import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Info

from skin import __version__

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
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def finite(value) -> float | None:
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


def build_info(registry: CollectorRegistry, role: str) -> Info:
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


class Warnings:
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


def status_label(value: str, known: tuple[str, ...], warn: Warnings) -> str:
    status = str(value).strip().lower()
    if status not in known:
        warn.once("metrics: unknown trial status %r (expected one of %s); counted as given",
                  value, ", ".join(known))
    return status
