"""The chief's state in the bucket: a journal of small batches, folded into one object per trial.

Layout under ``<root>/tuner/oracle/``::

    header.json              {"journal_from": F, "header": {...}}  the oracle's own state
    trials/<trial_id>.json   one record per trial (hyperparameters, metrics, attempts)
    journal/<slot>.json      {"seq": n, "header": {...} | null, "trials": {id: record}}

Every oracle mutation that a worker waits on (a trial handed out, a trial
ended) is made durable before the RPC answers, by *group commit*: whatever
changed while the previous batch was being written goes out as the next batch,
one object write however many workers are calling. Batches live in a ring of
``slots`` objects (no deletes: an emulator or a bucket pays per request). A
background *compaction* writes the changed trials' records and then the
header, whose ``journal_from`` says which batches it covers; the ring slot of
a batch is reused only once a compaction covers it.

The cost of a mutation does not depend on how many trials the search already
ran: a batch holds only what changed, a compaction only the trials that
changed since the last one.

Consistency: each batch is a snapshot taken under the oracle lock, so what it
holds agrees with itself. A compaction writes the *cut* of the last durable
batch (for each trial changed since the previous compaction, the record its
latest batch carried; the latest header a batch carried), never anything
newer than the journal. Loading applies the header, the trial objects, then
the batches with ``seq >= journal_from`` in order: the state of the last
durable batch, whether or not the last compaction got to write its header.
Progress reports are marked lazily (they ride with the next batch); what an
answer waits for is marked urgent. Loading is the one place that reads
everything.

Fencing: given a :class:`skin.tuning.lock.Fence`, every write is conditioned
on the chief's lock and on the generation of that object the chief last
wrote or loaded (0 for one it never saw); a failed condition stops the journal
(``error``) and the chief, before anything more is written.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from skin.errors import RetryableError
from skin.infra.storage import join

log = logging.getLogger(__name__)

# (header or None, {trial_id: record}); called with the oracle lock held.
Snapshot = Callable[[set, bool], tuple[dict | None, dict[str, dict]]]


@dataclass
class Loaded:
    """The chief's state as found in the bucket."""

    header: dict | None
    records: dict[str, dict] = field(default_factory=dict)
    replayed: dict[str, dict] = field(default_factory=dict)  # the records batches carried
    next_seq: int = 0
    journal_from: int = 0
    batches: int = 0


class OracleStore:
    """Reads and writes the objects of one search's oracle state (no threads, no policy)."""

    def __init__(self, storage, prefix_uri: str, *, slots: int = 1024, fence=None):
        self.storage = storage
        self.fence = fence  # skin.tuning.lock.Fence: conditional writes (None: plain ones)
        self.prefix = prefix_uri.rstrip("/")
        self.slots = slots
        self.header_uri = join(self.prefix, "header.json")
        self.trials_prefix = join(self.prefix, "trials")
        self.journal_prefix = join(self.prefix, "journal")

    def trial_uri(self, trial_id: str) -> str:
        return join(self.trials_prefix, f"{trial_id}.json")

    def slot_uri(self, seq: int) -> str:
        return join(self.journal_prefix, f"{seq % self.slots:04d}.json")

    def write_batch(self, seq: int, header: dict | None, records: dict[str, dict]) -> None:
        body = {"seq": seq, "header": header, "trials": records}
        self._write(self.slot_uri(seq), _dumps(body), "journal")

    def write_compaction(self, journal_from: int, header: dict, records: dict[str, dict]) -> None:
        for trial_id, record in records.items():
            self._write(self.trial_uri(trial_id), _dumps(record), "compaction")
        # The header last: until it lands, the batches it would retire still replay.
        self._write(self.header_uri, _dumps({"journal_from": journal_from, "header": header}),
                    "header")

    def _write(self, uri: str, data: bytes, what: str) -> None:
        if self.fence is None:
            self.storage.write_bytes(uri, data)
        else:
            self.fence.write_bytes(uri, data, what)

    def _seen(self, uri: str, generation: int) -> None:
        if self.fence is not None:
            self.fence.seen(uri, generation)

    def load(self) -> Loaded:
        """Header + trial records + the journal batches the header does not cover."""
        try:
            raw, generation = self.storage.read_versioned(self.header_uri)
            top = json.loads(raw)
            self._seen(self.header_uri, generation)
        except FileNotFoundError:
            top = {"journal_from": 0, "header": None}
        journal_from = int(top["journal_from"])
        loaded = Loaded(header=top["header"], journal_from=journal_from, next_seq=journal_from)
        for uri in self.storage.list(self.trials_prefix):
            if uri.endswith(".json"):
                raw, generation = self.storage.read_versioned(uri)
                record = json.loads(raw)
                self._seen(uri, generation)
                loaded.records[record["trial"]["trial_id"]] = record
        batches = []
        for uri in self.storage.list(self.journal_prefix):
            try:
                raw, generation = self.storage.read_versioned(uri)
                batch = json.loads(raw)
            except FileNotFoundError:  # pragma: no cover - listed a moment ago
                continue
            self._seen(uri, generation)
            if batch["seq"] >= journal_from:
                batches.append(batch)
        batches.sort(key=lambda b: b["seq"])
        for expected, batch in enumerate(batches, start=journal_from):
            if batch["seq"] != expected:  # a gap: later slots hold older laps; stop at the gap
                log.warning("oracle journal: batch %d missing; replaying up to %d",
                            expected, expected - 1)
                break
            if batch["header"] is not None:
                loaded.header = batch["header"]
            loaded.records.update(batch["trials"])
            loaded.replayed.update(batch["trials"])
            loaded.next_seq = batch["seq"] + 1
            loaded.batches += 1
        return loaded


class Journal:
    """Group commit of oracle mutations, plus background compaction.

    The oracle calls :meth:`mark` (with its lock held) after each mutation and
    gets a ticket; the RPC handler calls :meth:`wait` with the ticket after
    releasing the lock. One writer thread turns everything marked since its
    last write into one batch.

    A compaction writes the *cut* of the last durable batch: for every trial
    changed since the previous compaction, the record that its latest batch
    carried, and the latest header a batch carried. Nothing a compaction writes
    is newer than the journal, so a compaction cut short (the chief killed
    between two of its writes) leaves a state the replay still makes whole.
    """

    def __init__(self, store: OracleStore, lock: threading.RLock, snapshot: Snapshot, *,
                 loaded: Loaded | None = None, compact_interval_s: float = 10.0):
        loaded = loaded or Loaded(header=None)
        self.store = store
        self._lock = lock  # the oracle's lock: mutations and snapshots
        self._snapshot = snapshot
        self._cond = threading.Condition()  # never held while taking the oracle lock
        self._dirty_trials: set[str] = set()
        self._dirty_header = False
        # The cut: what the durable batches since the last compaction carried (latest per
        # trial), up to batch _cut_seq. The writer adds to it once a batch is in the bucket.
        self._cut_lock = threading.Lock()
        self._cut: dict[str, dict] = dict(loaded.replayed)
        self._cut_header: dict | None = loaded.header
        self._cut_seq = loaded.next_seq - 1
        self._next_seq = loaded.next_seq  # the batch the next mutation rides in
        self._durable = loaded.next_seq - 1  # every batch <= this is in the bucket
        self._journal_from = loaded.journal_from  # batches below: covered by a compaction
        self._pending = False
        self._compact_requested = False
        self._compact_lock = threading.Lock()  # one compaction at a time: headers never regress
        self._stopping = False
        self.error: BaseException | None = None
        self.compact_interval_s = compact_interval_s
        self.batches_written = 0
        self.compactions = 0
        self._threads = [threading.Thread(target=self._write_loop, name="oracle-journal",
                                          daemon=True),
                         threading.Thread(target=self._compact_loop, name="oracle-compact",
                                          daemon=True)]

    def start(self) -> Journal:
        for t in self._threads:
            t.start()
        return self

    # -- called by the oracle, lock held ------------------------------------------------

    def mark(self, trial_ids=(), header: bool = False, *, urgent: bool = True) -> int:
        """Record that these trials (and/or the header) changed; the ticket to wait for.

        ``urgent=False`` (progress reports): ride along with the next batch instead of
        causing a write of its own.
        """
        self._dirty_trials.update(trial_ids)
        self._dirty_header = self._dirty_header or header
        if urgent:
            self._wake()
        return self._next_seq

    # -- called by RPC handlers and the chief, lock not held -------------------------------

    def wait(self, ticket: int, timeout: float = 60.0) -> None:
        """Block until the batch ``ticket`` is in the bucket."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._durable < ticket:
                if self.error is not None:
                    raise RetryableError(f"oracle state cannot be saved: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RetryableError(f"oracle state not saved within {timeout:.0f} s")
                self._cond.wait(left)

    def flush(self, timeout: float = 60.0) -> None:
        """Write everything marked so far (lazy marks included) and wait for it."""
        with self._lock:
            dirty = bool(self._dirty_trials or self._dirty_header)
            ticket = self._next_seq if dirty else self._next_seq - 1
        if dirty:
            self._wake()
        self.wait(ticket, timeout)

    def compact(self, timeout: float | None = None) -> bool:
        """Fold the journal into per-trial objects now; False if not done within ``timeout``
        (it goes on in the background; stopping halfway is safe)."""
        if timeout is None:
            self._compact()
            return True
        t = threading.Thread(target=self._compact_quietly, name="oracle-compact-now",
                             daemon=True)
        t.start()
        t.join(timeout)
        return not t.is_alive()

    def stop(self, timeout: float = 0.5) -> None:
        """Stop the threads. Batches marked urgent are written first; a compaction still
        running is left to die with the process (stopping it halfway is safe)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- threads ----------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._pending = True
            self._cond.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending:
                    return
                self._pending = False
            with self._lock:
                trial_ids, header = self._dirty_trials, self._dirty_header
                self._dirty_trials, self._dirty_header = set(), False
                if not trial_ids and not header:
                    continue
                seq = self._next_seq
                self._next_seq += 1
                head, records = self._snapshot(trial_ids, header)
            try:
                self._wait_for_slot(seq)
                t0 = time.monotonic()
                self.store.write_batch(seq, head, records)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("batch %d: %d trials%s in %.1f ms", seq, len(records),
                              " + header" if head else "", (time.monotonic() - t0) * 1e3)
            except BaseException as e:  # noqa: BLE001 - reported to every waiter
                self._fail(e)
                return
            with self._cut_lock:
                self._cut.update(records)
                if head is not None:
                    self._cut_header = head
                self._cut_seq = seq
            with self._cond:
                self._durable = seq
                self.batches_written += 1
                self._cond.notify_all()

    def _wait_for_slot(self, seq: int) -> None:
        # A ring slot is reused only after a compaction covers the batch it holds.
        with self._cond:
            while seq >= self._journal_from + self.store.slots:
                if self.error is not None:
                    raise RetryableError(str(self.error))
                self._compact_requested = True
                self._cond.notify_all()
                self._cond.wait(1.0)
            if seq >= self._journal_from + self.store.slots // 2:
                self._compact_requested = True
                self._cond.notify_all()

    def _compact_loop(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.compact_interval_s
                while not self._compact_requested and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopping:
                    return
                self._compact_requested = False
            if not self._compact_quietly():
                return

    def _compact_quietly(self) -> bool:
        try:
            self._compact()
            return True
        except BaseException as e:  # noqa: BLE001
            self._fail(e)
            return False

    def _compact(self) -> None:
        with self._compact_lock:
            with self._cut_lock:
                last = self._cut_seq
                if not self._cut and self._journal_from > last:
                    return  # nothing new since the last compaction
                records, self._cut = self._cut, {}
                head = self._cut_header
            if head is None:  # nothing was ever written: no header to carry
                return
            t0 = time.monotonic()
            self.store.write_compaction(last + 1, head, records)
            log.debug("compaction: %d trials up to batch %d in %.2f s", len(records), last,
                      time.monotonic() - t0)
            with self._cond:
                self._journal_from = max(self._journal_from, last + 1)
                self.compactions += 1
                self._cond.notify_all()

    def _fail(self, e: BaseException) -> None:
        log.error("oracle state cannot be written to %s: %s", self.store.prefix, e)
        with self._cond:
            self.error = e
            self._cond.notify_all()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode("utf-8")


def _json_default(value: Any) -> Any:
    # numpy scalars in metrics and hyperparameter values
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
