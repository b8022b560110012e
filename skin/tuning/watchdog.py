"""A worker's own watchdog: a training that finishes no batch for too long ends the process.

A hung worker (a deadlocked input pipeline, a wedged GPU driver, an NFS read
that never returns) stops heartbeating and loses its trial, but its process
would live on and hold its GPU forever, and the Indexed Job would never
complete. While a trial runs, :class:`Watchdog` expects a finished batch (or
epoch) at least every ``limit_s`` (``search.watchdog_leases`` x
``search.lease_seconds``); when none comes it logs why, dumps every thread's
stack to stderr (where the hang is), and ends the process with ``os._exit``
and :data:`~skin.errors.EXIT_WATCHDOG`: Python cannot interrupt a blocked
C call, and a clean exit could block on the same hang. First, for at most a
few seconds, it ends the trial's attempt at the chief as failed with the
reason (``skin-report: watchdog`` on EndTrial), so the trial is re-queued
at once instead of after its lease, and the chief counts the exit
(``skin_chief_worker_watchdog_exits_total``). The Job replaces the
pod (the code counts against ``backoffLimitPerIndex``: a worker that keeps
hanging is a broken node or a broken model, and should end the Job).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from skin.errors import EXIT_WATCHDOG
from skin.tuning.preempt import flush_logs

log = logging.getLogger("skin.tuning")


class Watchdog:
    """Armed while a trial runs; :meth:`progress` on every finished batch and epoch."""

    def __init__(self, worker: str, limit_s: float, *, exit_code: int = EXIT_WATCHDOG,
                 on_fire: Callable[[str], None] | None = None, on_fire_s: float = 5.0):
        self.worker, self.limit_s, self.exit_code = worker, float(limit_s), exit_code
        self.on_fire, self.on_fire_s = on_fire, on_fire_s  # last words, bounded in time
        self._what: str | None = None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.limit_s > 0

    def start(self) -> Watchdog:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"watchdog-{self.worker}")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def arm(self, what: str) -> None:
        self._last = time.monotonic()
        self._what = what

    def disarm(self) -> None:
        self._what = None

    def progress(self) -> None:
        self._last = time.monotonic()

    def _run(self) -> None:
        interval = min(5.0, max(0.05, self.limit_s / 10))
        while not self._stop.wait(interval):
            what = self._what
            idle = time.monotonic() - self._last
            if what is None or idle <= self.limit_s:
                continue
            log.error("%s: watchdog: %s finished no batch for %.0f s (limit %.0f s: "
                      "search.watchdog_leases x search.lease_seconds); the worker is hung. "
                      "Exiting %d so the pod is replaced and its GPU freed; stacks follow",
                      self.worker, what, idle, self.limit_s, self.exit_code)
            flush_logs()
            try:
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            except Exception:  # noqa: BLE001 - stderr may be gone; exit regardless
                pass
            if self.on_fire is not None:  # e.g. tell the chief, so the trial moves on now
                reason = (f"watchdog: {what} finished no batch for {idle:.0f} s on "
                          f"{self.worker} (limit {self.limit_s:.0f} s)")
                last = threading.Thread(target=self._last_words, args=(reason,), daemon=True)
                last.start()
                last.join(self.on_fire_s)
            flush_logs()
            os._exit(self.exit_code)

    def _last_words(self, reason: str) -> None:
        try:
            self.on_fire(reason)
        except Exception as e:  # noqa: BLE001 - we exit regardless
            log.warning("%s: watchdog: could not tell the chief (%s: %s)", self.worker,
                        type(e).__name__, e)
