"""SIGTERM in a tuning role: a preemption to survive, not a crash.

Spot and preemptible nodes go away with ~30 s of notice (GKE gives non-system
pods the first 15 s); a drain or an eviction sends the same SIGTERM. What a
role does with it:

- a **worker** training a trial stops at the next batch boundary (the
  checkpoint of its last finished epoch is already in the bucket: every epoch
  uploads it before the next batch starts), tells the chief it *releases* the
  trial (``skin-report: release``, protocol.py) so another worker resumes it
  at once from that epoch, and exits :data:`~skin.errors.EXIT_RELEASED`;
  a worker holding no trial exits at once with the same code;
- the **chief** stops serving at its next tick, flushes its journal and exits
  :data:`~skin.errors.EXIT_RELEASED`; the next chief resumes from the bucket.

The exit code is not a failure: the Jobs' podFailurePolicy ignores it (no
``backoffLimitPerIndex`` spent) and ``skin run`` restarts the role at once.

:class:`Preemption` is the process's handler. Outside a :meth:`~Preemption.deferred`
section it raises :class:`Preempted` right away (nothing is held); inside one
it only records the request, and the code polls :attr:`~Preemption.requested`
at its safe points. If the role has not left ``deadline_s`` after the signal
(a batch that never ends), :attr:`~Preemption.on_deadline` runs on a timer
thread, which releases what it can and ends the process with the same code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from skin.errors import EXIT_RELEASED

log = logging.getLogger("skin.tuning")

# How long after SIGTERM a worker may take to reach a batch boundary before the deadline
# releases its trial from another thread: inside GKE's 15 s for non-system pods on a spot
# preemption, with room for the release call.
DEFAULT_DEADLINE_S = 10.0


class Preempted(BaseException):
    """SIGTERM: leave the role now (exit EXIT_RELEASED). A BaseException, like
    KeyboardInterrupt, so no ``except Exception`` on the way swallows it."""

    exit_code = EXIT_RELEASED


class Preemption:
    """The SIGTERM handler of one role process (see the module docstring)."""

    def __init__(self, role: str = "", deadline_s: float = DEFAULT_DEADLINE_S):
        self.role = role
        self.deadline_s = deadline_s
        self.requested = threading.Event()
        self.on_deadline: Callable[[], None] | None = None
        self._depth = 0
        self._previous = None
        self._installed = False

    # -- installation ----------------------------------------------------------------------

    def install(self) -> Preemption:
        """Take over SIGTERM (main thread only; elsewhere, e.g. in a test thread, a no-op)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- the signal --------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        first = not self.requested.is_set()
        if first:
            self.requested.set()
            log.warning("%s: %s received (preemption, drain or deletion): stopping at the next "
                        "safe point (exit %d)", self.role or "role", signal.Signals(signum).name,
                        EXIT_RELEASED)
            if self.on_deadline is not None and self.deadline_s > 0:
                threading.Thread(target=self._deadline, daemon=True,
                                 name="preemption-deadline").start()
        if self._depth == 0:
            raise Preempted(signal.Signals(signum).name)

    def _deadline(self) -> None:
        time.sleep(self.deadline_s)
        log.error("%s: still running %.0f s after SIGTERM (no batch boundary reached); "
                  "releasing from the deadline thread and exiting %d", self.role or "role",
                  self.deadline_s, EXIT_RELEASED)
        try:
            if self.on_deadline is not None:
                self.on_deadline()
        except Exception as e:  # noqa: BLE001 - we exit regardless
            log.warning("%s: release at the deadline failed: %s: %s", self.role or "role",
                        type(e).__name__, e)
        flush_logs()
        os._exit(EXIT_RELEASED)

    # -- safe points -------------------------------------------------------------------------

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: SIGTERM only sets :attr:`requested`; the code stops at its own safe points."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def check(self) -> None:
        """Raise :class:`Preempted` when a stop was asked for."""
        if self.requested.is_set():
            raise Preempted("SIGTERM")

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; :class:`Preempted` as soon as a stop is asked for."""
        if self.requested.wait(max(0.0, seconds)):
            raise Preempted("SIGTERM")


def flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
