"""The chief's lock in the bucket, and the fence every write of the chief's state goes through.

One object, ``<root>/tuner/oracle/lock.json``::

    {"holder": "host:pid:nonce", "term": 3, "acquired": t0, "renewed": t, "expires": t + ttl}

- **acquire**: create it only if absent (``ifGenerationMatch=0``). If it exists
  and its ``expires`` has passed (or it was released), replace it with a
  precondition on the generation just read: of two chiefs racing for a free
  lock, exactly one write succeeds. If it is fresh, either wait (under
  Kubernetes, or ``chief.on_lock_held: wait``) or raise
  :class:`~skin.errors.LockHeldError` (exit 5) naming the holder.
- **renew**: a thread rewrites it every ``ttl / 3`` with a precondition on the
  generation it last wrote. A failed precondition means another chief took
  it: the lock is *lost*. So is a lock that could not be renewed (storage
  away) before ``ttl`` ran out on this process's monotonic clock, since a
  second chief may then take it.
- **release**: on a clean exit the holder writes it back as expired (again
  under its precondition), so a successor need not wait for the expiry.

:class:`Fence` makes every write of the chief's state (journal slots, trial
records, header, ``result.json``) conditional twice: on the lock being held
(checked on this process's clock just before the request) and on the
generation of the object this chief last wrote or read (0: it must not exist).
A chief frozen past its expiry (SIGSTOP, a long GC pause, a partitioned node)
that wakes up finds its lock expired on its own clock and writes nothing; and
even a write already in flight cannot land over a successor's, whose objects
carry generations the frozen chief never saw. Either way the chief's
``lost`` event is set and it stops serving at once (exit 6).

Expiry times are wall-clock seconds written by the holder and read by a
contender: chiefs on nodes whose clocks disagree by more than a fraction of
``ttl`` should use a longer ``chief.lock_seconds``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from skin.errors import FencedError, LockHeldError, PreconditionFailedError, RetryableError
from skin.tuning import protocol as wire

log = logging.getLogger("skin.tuning")

# Our own view of the lease ends this much earlier than the expiry others read: room for
# the time a write takes to land and for clocks that disagree a little.
_SAFETY = 0.8


def _clock() -> float:
    """Seconds that keep counting while the process is frozen or the machine sleeps."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


def holder_id() -> str:
    """This process, recognisably: ``host:pid:nonce``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def should_wait(mode: str, env=None) -> bool:
    """``chief.on_lock_held``: wait (Kubernetes restarts and replacements) or exit (manual)."""
    if mode == "auto":
        env = os.environ if env is None else env
        return bool(env.get("KUBERNETES_SERVICE_HOST"))
    return mode == "wait"


class ChiefLock:
    """The search's lock object; see the module docstring."""

    def __init__(self, storage, uri: str, ttl_s: float, *, holder: str | None = None,
                 metrics=None, on_lost: Callable[[str], None] | None = None):
        self.storage, self.uri, self.ttl_s = storage, uri, float(ttl_s)
        self.holder = holder or holder_id()
        self.metrics = metrics
        self.on_lost = on_lost
        self.generation: int | None = None  # of our last write; None: not held
        self.term = 0
        self.lost = threading.Event()
        self.reason = ""
        self._valid_until = 0.0  # monotonic: when our last renewal runs out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    # -- taking it --------------------------------------------------------------------

    def acquire(self, wait: bool, timeout_s: float | None = None, poll_s: float | None = None,
                on_wait: Callable[[dict], None] | None = None) -> ChiefLock:
        """Take the lock; LockHeldError if it is fresh and ``wait`` is False."""
        deadline = None if timeout_s is None else _clock() + timeout_s
        poll_s = poll_s or max(0.2, min(5.0, self.ttl_s / 4))
        told = None
        while True:
            held = self._try_acquire()
            if held is None:
                self._publish()
                return self
            if not wait:
                raise LockHeldError(
                    f"another chief holds this search's lock ({self.uri}: {held.get('holder')}, "
                    f"renewed {time.time() - float(held.get('renewed', 0)):.0f} s ago, expires "
                    f"in {float(held.get('expires', 0)) - time.time():.0f} s). Two chiefs must "
                    "never serve one search: stop the other one, or wait for its lock to expire "
                    "(chief.lock_seconds) and start again")
            if told != held.get("holder"):
                told = held.get("holder")
                log.warning("chief: the lock %s is held by %s (expires in %.0f s); waiting for "
                            "it", self.uri, told, float(held.get("expires", 0)) - time.time())
                if on_wait is not None:
                    on_wait(held)
            if deadline is not None and _clock() > deadline:
                raise LockHeldError(f"{self.uri}: still held by {told} after {timeout_s:.0f} s")
            left = float(held.get("expires", 0)) - time.time()
            time.sleep(min(poll_s, max(0.05, left + 0.05)))

    def _try_acquire(self) -> dict | None:
        """None when we hold it now; else the holder's document."""
        started = _clock()
        try:
            data, generation = self.storage.read_versioned(self.uri)
        except FileNotFoundError:
            data, generation = None, 0
        doc: dict = {}
        if data is not None:
            try:
                doc = json.loads(data)
            except ValueError:
                doc = {}  # unreadable: treat as expired (written by no chief of ours)
            if float(doc.get("expires", 0)) > time.time() and not doc.get("released"):
                return doc
        self.term = int(doc.get("term", 0)) + 1
        try:
            self.generation = self.storage.write_bytes(
                self.uri, self._document(acquired=time.time()), if_generation_match=generation)
        except PreconditionFailedError:
            self.generation = None
            try:
                return json.loads(self.storage.read_bytes(self.uri))
            except (FileNotFoundError, ValueError):
                return {"holder": "?", "expires": time.time() + 0.1}
        self._valid_until = started + _SAFETY * self.ttl_s
        self._acquired_at = time.time()
        if doc.get("holder"):
            log.info("chief: took over the lock %s from %s (term %d)", self.uri,
                     doc.get("holder"), self.term)
        else:
            log.info("chief: holding the lock %s (term %d, expires after %g s without renewal)",
                     self.uri, self.term, self.ttl_s)
        return None

    def _document(self, *, acquired: float, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "term": self.term, "acquired": acquired,
                           "renewed": now, "expires": 0 if released else now + self.ttl_s,
                           "released": released}).encode()

    # -- keeping it --------------------------------------------------------------------

    def start(self) -> ChiefLock:
        """Renew every ttl/3 in a daemon thread until :meth:`release` or the lock is lost."""
        self._thread = threading.Thread(target=self._renew_loop, name="chief-lock", daemon=True)
        self._thread.start()
        return self

    def held(self) -> bool:
        """True while our last renewal has not run out (on our clock) and nothing said lost."""
        return (self.generation is not None and not self.lost.is_set()
                and _clock() < self._valid_until)

    def check(self) -> None:
        """Raise FencedError unless :meth:`held`; marks the lock lost when it ran out."""
        if self.held():
            return
        if not self.lost.is_set():
            self.lose("its lock expired before it could renew it (frozen, or storage away "
                      f"for more than {self.ttl_s:g} s)")
        raise FencedError(f"this chief lost its lock {self.uri}: {self.reason}")

    def lose(self, reason: str) -> None:
        """Mark the lock lost (once): stop renewing, tell the chief."""
        with self._write_lock:
            if self.lost.is_set():
                return
            self.reason = reason
            self.lost.set()
        self._stop.set()
        log.error("chief: lost the lock %s: %s; serving stops now and nothing more is written",
                  self.uri, reason)
        self._publish(lost=True)
        if self.on_lost is not None:
            self.on_lost(reason)

    def renew(self) -> None:
        """One renewal under our generation; marks the lock lost on a failed precondition."""
        started = _clock()
        if not self.held():
            self.check()
        with self._write_lock:
            try:
                self.generation = self.storage.write_bytes(
                    self.uri, self._document(acquired=self._acquired_at),
                    if_generation_match=self.generation)
            except PreconditionFailedError:
                pass
            else:
                self._valid_until = started + _SAFETY * self.ttl_s
                return
        self._count_precondition_failure("lock")
        self.lose("another chief rewrote the lock (it took over after our lease expired)")
        raise FencedError(f"this chief lost its lock {self.uri}: {self.reason}")

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                self.renew()
            except FencedError:
                return
            except RetryableError as e:  # storage away: try again until the lease runs out
                log.warning("chief: could not renew the lock %s (%s); %.1f s of it left", self.uri,
                            e, self._valid_until - _clock())
                if not self.held():
                    self.lose(f"could not renew it for {self.ttl_s:g} s ({e})")
                    return
            except Exception as e:  # never let the thread die silently
                log.exception("chief: renewing the lock failed")
                if not self.held():
                    self.lose(f"could not renew it: {type(e).__name__}: {e}")
                    return

    def release(self) -> None:
        """Stop renewing; write the lock back as expired if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._write_lock:
            if self.generation is None or self.lost.is_set():
                return
            try:
                self.storage.write_bytes(self.uri, self._document(
                    acquired=self._acquired_at, released=True),
                    if_generation_match=self.generation)
                log.info("chief: released the lock %s", self.uri)
            except PreconditionFailedError:
                log.warning("chief: the lock %s was no longer ours at release", self.uri)
            except Exception as e:  # noqa: BLE001 - it expires by itself anyway
                log.warning("chief: could not release the lock %s (%s); it expires in %g s",
                            self.uri, e, self.ttl_s)
            self.generation = None
        self._publish()

    # -- metrics ----------------------------------------------------------------------

    def _publish(self, lost: bool = False) -> None:
        wire.hook(self.metrics, "chief_lock", self.generation is not None and not lost, lost)

    def _count_precondition_failure(self, what: str) -> None:
        wire.hook(self.metrics, "precondition_failed", what)


class Fence:
    """Writes of the chief's state: each on the lock being held and on the generation this
    chief last wrote or read of that object (0: it must not exist yet)."""

    def __init__(self, storage, lock: ChiefLock):
        self.storage, self.lock = storage, lock
        self._generations: dict[str, int] = {}

    def seen(self, uri: str, generation: int) -> None:
        """Record the generation this chief read an object at (its state as loaded)."""
        self._generations[uri] = int(generation)

    def write_bytes(self, uri: str, data: bytes, what: str = "state") -> int:
        self.lock.check()
        expected = self._generations.get(uri, 0)
        try:
            generation = self.storage.write_bytes(uri, data, if_generation_match=expected)
        except PreconditionFailedError as e:
            self.lock._count_precondition_failure(what)
            self.lock.lose(f"{e} (another chief wrote this search's state)")
            raise FencedError(f"this chief lost its lock: {e}") from None
        self._generations[uri] = generation
        return generation

    def write_json(self, uri: str, obj, what: str = "state") -> int:
        return self.write_bytes(uri, (json.dumps(obj, indent=2) + "\n").encode(), what)

    def write_current(self, uri: str, obj, what: str = "state") -> int:
        """Replace whatever is there (its current generation read first), lock held."""
        self.lock.check()
        try:
            self._generations[uri] = self.storage.stat(uri).version
        except FileNotFoundError:
            self._generations[uri] = 0
        return self.write_json(uri, obj, what)
