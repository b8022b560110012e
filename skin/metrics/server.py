"""A role's metrics endpoint: :func:`role_metrics` (a tuning role's hooks configured
from the experiment) and :func:`serve` (``/metrics`` over HTTP, with a way to wait for
the next scrape before the role exits)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry

from skin.metrics.chief import ChiefMetrics
from skin.metrics.worker import WorkerMetrics


def role_metrics(registry: CollectorRegistry, exp, tuner_id: str) -> ChiefMetrics | WorkerMetrics:
    """The hooks of a tuning role (``chief`` or ``tuner<i>``), configured from the experiment:
    objective and direction, the workers to expect, the lease that counts as connected."""
    if tuner_id == "chief":
        return ChiefMetrics(registry, objective=exp.search.objective,
                            direction=exp.search.direction, workers=exp.workers,
                            lease_seconds=exp.search.lease_seconds, experiment=exp.name,
                            tuner=exp.search.tuner)
    return WorkerMetrics(registry, tuner_id, objective=exp.search.objective)


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
