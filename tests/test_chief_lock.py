"""skin.tuning.lock against the real fake-gcs-server: the chief's lock and its fence.

The process-level faults (two chief processes, SIGSTOP past the expiry) are in
tests/test_fencing.py; here the same rules one call at a time.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from skin.errors import EXIT_FENCED, EXIT_LOCKED, FencedError, LockHeldError
from skin.tuning.lock import ChiefLock, Fence, should_wait


@pytest.fixture
def lock_uri(bucket) -> str:
    return f"gs://{bucket}/exp/tuner/oracle/lock.json"


def test_two_chiefs_racing_for_a_free_lock_one_wins(storage, lock_uri):
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def contend(name: str) -> None:
        lock = ChiefLock(storage, lock_uri, 30, holder=name)
        barrier.wait()
        try:
            lock.acquire(wait=False)
            outcomes[name] = "holds"
        except LockHeldError as e:
            outcomes[name] = str(e)

    threads = [threading.Thread(target=contend, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()).count("holds") == 1, outcomes
    winner = next(n for n, o in outcomes.items() if o == "holds")
    loser = next(o for o in outcomes.values() if o != "holds")
    assert f"another chief holds this search's lock ({lock_uri}: {winner}" in loser
    assert json.loads(storage.read_text(lock_uri))["holder"] == winner
    assert LockHeldError.exit_code == EXIT_LOCKED == 5


def test_an_expired_lock_is_taken_over_and_the_old_holder_is_fenced(storage, lock_uri):
    old = ChiefLock(storage, lock_uri, 1.0, holder="old").acquire(wait=False)
    old_fence = Fence(storage, old)
    state = lock_uri.replace("lock.json", "header.json")
    old_fence.write_bytes(state, b"old state")
    with pytest.raises(LockHeldError):
        ChiefLock(storage, lock_uri, 1.0, holder="new").acquire(wait=False)
    time.sleep(1.2)  # the old holder is "frozen" past its expiry: no renewal
    new = ChiefLock(storage, lock_uri, 30, holder="new").acquire(wait=False)
    assert new.term == old.term + 1
    new_fence = Fence(storage, new)
    new_fence.seen(state, storage.stat(state).version)  # as the new chief's load does
    new_fence.write_bytes(state, b"new state")

    # The old holder wakes up: on its own clock its lease ran out, so it writes nothing.
    assert not old.held()
    with pytest.raises(FencedError, match="lost its lock"):
        old_fence.write_bytes(state, b"stale state")
    assert old.lost.is_set()
    with pytest.raises(FencedError):
        old.renew()
    old.release()  # a lost lock is not written back
    assert storage.read_text(state) == "new state"
    assert json.loads(storage.read_text(lock_uri))["holder"] == "new"
    assert FencedError.exit_code == EXIT_FENCED == 6


def test_a_write_that_finds_its_object_changed_fences_the_chief(storage, lock_uri):
    """Even with the lock fresh on our clock, a generation we never saw stops us."""
    from prometheus_client import CollectorRegistry

    from skin.metrics.chief import ChiefMetrics

    registry = CollectorRegistry()
    lock = ChiefLock(storage, lock_uri, 30, holder="a",
                     metrics=ChiefMetrics(registry)).acquire(wait=False)
    assert registry.get_sample_value("skin_chief_lock_held") == 1
    assert registry.get_sample_value("skin_chief_lock_lost") == 0
    fence = Fence(storage, lock)
    slot = lock_uri.replace("lock.json", "journal/0000.json")
    fence.write_bytes(slot, b"batch 0")
    storage.write_bytes(slot, b"someone else's batch 0")  # a second writer
    lost = []
    lock.on_lost = lost.append
    with pytest.raises(FencedError, match="precondition failed"):
        fence.write_bytes(slot, b"batch 1024")
    assert lost and "another chief wrote" in lost[0]
    assert storage.read_text(slot) == "someone else's batch 0"
    assert registry.get_sample_value("skin_chief_lock_held") == 0
    assert registry.get_sample_value("skin_chief_lock_lost") == 1
    assert registry.get_sample_value("skin_chief_precondition_failures_total",
                                     {"kind": "state"}) == 1


def test_renewal_keeps_the_lock_and_release_frees_it_at_once(storage, lock_uri):
    lock = ChiefLock(storage, lock_uri, 1.5, holder="a").acquire(wait=False).start()
    time.sleep(2.5)  # longer than the ttl: only the renewals keep it
    assert lock.held()
    with pytest.raises(LockHeldError):
        ChiefLock(storage, lock_uri, 1.5, holder="b").acquire(wait=False)
    lock.release()
    assert json.loads(storage.read_text(lock_uri))["released"] is True
    b = ChiefLock(storage, lock_uri, 1.5, holder="b").acquire(wait=False)  # no waiting
    assert b.held()


def test_a_waiting_chief_takes_the_lock_when_it_expires(storage, lock_uri):
    ChiefLock(storage, lock_uri, 1.0, holder="gone").acquire(wait=False)  # never renewed
    waited = []
    t0 = time.monotonic()
    lock = ChiefLock(storage, lock_uri, 1.0, holder="next").acquire(
        wait=True, timeout_s=10, on_wait=waited.append)
    assert lock.held() and waited[0]["holder"] == "gone"
    assert 0.5 < time.monotonic() - t0 < 5


def test_wait_or_exit():
    assert should_wait("auto", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert not should_wait("auto", {})
    assert should_wait("wait", {}) and not should_wait("exit", {"KUBERNETES_SERVICE_HOST": "x"})
