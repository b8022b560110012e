"""Errors typed by intent, and the exit codes they map to.

The exit codes are a contract with Kubernetes: the Jobs' podFailurePolicy
fails the whole Job on a fatal code and lets the Job retry the pod on a
retryable one (k8s/tuning). Keep this table, README.md and the manifests in
step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator

# 0 and 1 keep their usual meaning (1: an unexpected bug, retried by the Job's backoffLimit).
EXIT_OK = 0
EXIT_UNEXPECTED = 1
# `skin predict` (a command for people and scripts, never a Job): 1 also when some inputs
# could not be scored (each named on stderr, the others scored), 3 (EXIT_DATA) when none
# could, 0 only when every input was scored. Like grep, gsutil and kubectl: non-zero when
# anything failed.
EXIT_SOME_FAILED = 1
EXIT_CONFIG = 2  # fatal: bad experiment file, bad flag, bad environment value; the oracle token
#                  missing (chief in Kubernetes, or a Secret file that is not there) or refused
#                  by the chief; retrain's best hyperparameters outside the search space
EXIT_DATA = 3  # fatal: the data cannot be staged or read (nothing usable, manifest mismatch)
EXIT_SEARCH_FAILED = 4  # fatal: too many consecutive trials failed; the search space is broken
EXIT_LOCKED = 5  # a manual chief start found another chief holding the search's lock
EXIT_FENCED = 6  # a chief lost its lock (or a write precondition failed): it stopped writing
EXIT_PUBLISH_RACE = 7  # a retrain published its version but another moved models/LATEST first
EXIT_RETRYABLE = 75  # retry: lost connection, storage unavailable, chief gone (EX_TEMPFAIL)
EXIT_RELEASED = 80  # stopped on SIGTERM at a safe point: a worker handed its trial back (it
#                     resumes elsewhere from its last finished epoch), a chief saved its state.
#                     Not a failure: the Jobs' podFailurePolicy ignores it, `skin run` restarts
#                     the role at once without counting a restart (skin/tuning/preempt.py).
EXIT_WATCHDOG = 81  # a worker's training made no progress (no finished batch) for
#                     search.watchdog_leases x search.lease_seconds: it exits by itself so the
#                     Job replaces it and its GPU is freed (skin/tuning/watchdog.py). Retried.
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM (the Job treats a disruption as retryable)

FATAL_EXIT_CODES = (EXIT_CONFIG, EXIT_DATA, EXIT_SEARCH_FAILED)


class SkinError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = EXIT_UNEXPECTED


class ConfigError(SkinError, ValueError):
    """The experiment file, a flag or an environment value is wrong. Fatal."""

    exit_code = EXIT_CONFIG


class DataError(SkinError):
    """The data cannot be staged or read. Fatal."""

    exit_code = EXIT_DATA


class DocumentError(DataError, ValueError):
    """A document in the bucket (skin.infra.artifacts) has a shape this version cannot read: not a
    JSON object, a required key missing or of the wrong type. Fatal where the role needs it."""


class SearchFailedError(SkinError):
    """The search stopped: too many consecutive trials failed. Fatal."""

    exit_code = EXIT_SEARCH_FAILED


class PreconditionFailedError(SkinError):
    """A conditional write found the object changed (HTTP 412): someone else wrote it."""

    exit_code = EXIT_FENCED

    def __init__(self, uri: str, expected_generation: int | None = None):
        self.uri, self.expected_generation = uri, expected_generation
        want = ("absent" if expected_generation == 0 else
                f"at generation {expected_generation}" if expected_generation else "unchanged")
        super().__init__(f"{uri}: precondition failed (expected it {want}; another writer "
                         "changed it)")


class LockHeldError(SkinError):
    """Another chief holds this search's lock and it is fresh (a manual second start)."""

    exit_code = EXIT_LOCKED


class FencedError(SkinError):
    """This chief lost its lock: it stops serving and writes nothing more."""

    exit_code = EXIT_FENCED


class PublishRaceLostError(SkinError):
    """Another retrain moved models/LATEST between our read and our write."""

    exit_code = EXIT_PUBLISH_RACE


class RetryableError(SkinError):
    """A transient failure: running the same role again may succeed."""

    exit_code = EXIT_RETRYABLE


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an exception that ends a role: the one mapping of exception
    types to exit codes (an ``exit_code`` attribute: SkinError and the tuning roles'
    ``Preempted``; Ctrl-C/SIGTERM 130; a lost connection 75; anything else 1)."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return EXIT_RETRYABLE
    return EXIT_UNEXPECTED


_log = logging.getLogger("skin")


def role_ended(role: str, exc: BaseException) -> int:
    """Say why ``role`` ended on ``exc`` and return its exit code: the only place that does.

    One logged line for what the role raised on purpose (a SkinError names the problem), a
    warning for a stop on a signal, the traceback for a bug (exit 1)."""
    code = exit_code_for(exc)
    if isinstance(exc, KeyboardInterrupt):
        _log.warning("%s interrupted (exit %d)", role, code)
    elif code == EXIT_RELEASED:
        _log.warning("%s stopped on SIGTERM at a safe point (exit %d): its work is saved or "
                     "handed back, and resumes from there", role, code)
    elif isinstance(exc, SkinError):  # on purpose: one line that names the problem
        _log.error("%s: error: %s (exit %d)", role, exc, code)
    else:
        _log.error("%s failed unexpectedly (exit %d)", role, code, exc_info=exc)
    return code


def exits(role: str | Callable[..., str]):
    """Decorate a role's entry function: what it raises becomes its exit code (role_ended);
    what it returns is its exit code. ``role`` names it, or is called with the function's
    arguments to name it (a worker's tuner id)."""
    def decorate(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def run(*args, **kwargs) -> int:
            try:
                return fn(*args, **kwargs)
            except (SystemExit, GeneratorExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - every ending gets its code here
                return role_ended(role(*args, **kwargs) if callable(role) else role, exc)
        return run
    return decorate


@contextlib.contextmanager
def interrupts(*signals: signal.Signals) -> Iterator[None]:
    """Inside, each of ``signals`` raises KeyboardInterrupt like Ctrl-C does (exit 130 where it
    ends a role), so the role stops cleanly within the grace period; the previous handlers
    come back on leaving. As PID 1 in a container, Python would otherwise ignore SIGTERM and
    be SIGKILLed at the end of the grace period. Off the main thread (tests): no change."""
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
