"""What the tuning roles tell their observers (metrics), as typed interfaces.

:class:`ChiefHooks` and :class:`WorkerHooks` name every event the chief and a
worker report; their methods do nothing, so an instance of either is the "metrics
off" implementation and the roles never check for None. ``skin.metrics.chief``
(:class:`~skin.metrics.chief.ChiefMetrics`) and ``skin.metrics.worker``
(:class:`~skin.metrics.worker.WorkerMetrics`) implement them with Prometheus series.

A hook never ends a trial or the search: in every subclass, each hook method that
overrides one of the interface's is wrapped so that an exception is logged once (per
hook) and swallowed.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("skin.tuning")


class _Hooks:
    """Base of the hook interfaces: wraps the overriding hook methods of subclasses."""

    _interface: type | None = None  # the class whose methods are the hooks

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if _Hooks in cls.__bases__:  # an interface itself: its methods are the no-ops
            cls._interface = cls
            return
        names = [n for n, v in vars(cls._interface).items()
                 if callable(v) and not n.startswith("_")]
        for name in names:
            if name in vars(cls):
                setattr(cls, name, _never_raises(vars(cls)[name]))


_broken: set[str] = set()
_broken_lock = threading.Lock()


def _never_raises(method):
    name = method.__qualname__

    @functools.wraps(method)
    def hook(self, *args, **kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - metrics never break the search
            with _broken_lock:
                first = name not in _broken
                _broken.add(name)
            if first:
                log.warning("metrics hook %s failed (%s: %s); going on without it", name,
                            type(e).__name__, e)

    return hook


class ChiefHooks(_Hooks):
    """The chief's events. Called from the gRPC threads and the main thread."""

    def trial_started(self, worker: str) -> None:
        """A trial was handed to ``worker``."""

    def trial_ended(self, status: str, duration_s: float, score: float | None, worker: str,
                    trial_id: str | None = None) -> None:
        """An attempt ended with ``status`` (skin.metrics.TRIAL_END_STATUSES); ``score`` is
        the objective of a completed trial, else None."""

    def trial_stopped_early(self) -> None:
        """The early-stopping rule ended a trial (search.early_stopping)."""

    def confirmation_started(self) -> None:
        """A confirmation trial was handed out (search.confirm)."""

    def worker_report(self, worker: str, epoch: int | None = None,
                      epochs_budget: int | None = None) -> None:
        """Any call from ``worker``; with ``epoch`` (epochs done of its trial) a progress
        report."""

    def worker_watchdog_exit(self, worker: str) -> None:
        """``worker``'s watchdog ended its hung trial; the worker exits next."""

    def oracle_refused(self, reason: str) -> None:
        """An oracle call was refused (skin.metrics.ORACLE_REFUSAL_REASONS)."""

    def oracle_call(self, method: str, seconds: float) -> None:
        """An oracle RPC was answered (or refused) after ``seconds``."""

    def set_search_progress(self, done: int, total_estimate: int | None,
                            eta_seconds: float | None) -> None:
        """Trials done of the estimated total, and the time left when known."""

    def search_finished(self) -> None:
        """The search ended; no more trials."""

    def chief_lock(self, held: bool, lost: bool = False) -> None:
        """Whether this chief holds the search's lock; ``lost``: another chief took it."""

    def precondition_failed(self, kind: str) -> None:
        """A conditional write of the chief's state (``kind``: lock, journal, compaction,
        header, result) found the object changed by another writer."""


class WorkerHooks(_Hooks):
    """A worker's events (one process, one trial at a time)."""

    def trial_started(self, epochs_budget: int) -> None:
        """A trial starts training for up to ``epochs_budget`` epochs."""

    def epoch_ended(self, epoch: int, seconds: float, images_per_second: float,
                    logs: Mapping[str, float] | None) -> None:
        """Keras' epoch ``epoch`` ended after ``seconds``; ``logs``: Keras' epoch logs."""

    def trial_finished(self, status: str) -> None:
        """The worker is done with its trial (``completed``, ``failed``, ``released`` ...)."""

    def data_synced(self, nbytes: int, seconds: float) -> None:
        """The staged data was copied to local disk."""


class Listener:
    """What the oracle (skin.tuning.oracle.LeasedOracle) tells the chief, with the oracle's
    lock held: skin.tuning.chief.ChiefListener logs it and calls the ChiefHooks. This one
    hears nothing (an oracle without a chief). ``trial`` is keras-tuner's Trial, ``attempt``
    the oracle's record of the attempt."""

    def trial_started(self, oracle: Any, trial, attempt: dict) -> None: ...
    def trial_ended(self, oracle: Any, trial, attempt: dict) -> None: ...
    def worker_report(self, worker: str, trial, epochs_done: int) -> None: ...
    def worker_alive(self, worker: str) -> None: ...
    def search_ended(self, oracle: Any) -> None: ...
    def trial_stopped_early(self, trial_id: str) -> None: ...
    def confirmation_started(self, trial_id: str) -> None: ...
