"""A batch job's metrics (``skin_stage_*``, ``skin_retrain_*``), pushed to a Pushgateway
at its end or logged. Shared parts: skin.metrics."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge

from skin.metrics import (
    BATCH_JOBS,
    NAME_RE,
    build_info,
    finite,
)

log = logging.getLogger("skin.metrics")


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
        if not NAME_RE.match(job):
            raise ValueError(f"job: {job!r} is not valid; expected a metric-name word such as "
                             f"{' or '.join(BATCH_JOBS)}")
        self.registry = registry
        self.job = job
        self.experiment = experiment
        r = registry
        p = f"skin_{job}"
        build_info(r, job)
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
        value = finite(value)
        if value is not None:
            self._counts.labels(kind).set(value)
            self._values[f"items.{kind}"] = value

    def set_model_metrics(self, metrics: Mapping[str, object]) -> None:
        """Every finite number in ``metrics`` (lists, strings and nested values are skipped)."""
        for name, value in metrics.items():
            if isinstance(value, bool):
                continue
            value = finite(value) if isinstance(value, (int, float)) else None
            if value is not None and NAME_RE.match(str(name)):
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
