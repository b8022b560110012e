"""The leased oracle's state as the journal writes it and a restarted chief reads it back.

:class:`JournalledState` is mixed into :class:`~skin.tuning.oracle.LeasedOracle`.
Instead of rewriting all of its state on every change (stock ``Oracle.save``), each
change marks the trials it touched and the header for
:class:`~skin.tuning.journal.Journal` (:meth:`_mark`); the journal takes
:meth:`snapshot` of them. Everything that grows with the number of trials (start/end
order, run counts, retry queue, value hashes, ongoing trials) is left out of the header
and derived from the per-trial records in :meth:`restore`.
"""

from __future__ import annotations

import time

from keras_tuner.src.engine import trial as trial_module

TrialStatus = trial_module.TrialStatus
RUNNING, FINISHED, FAILED = "running", "finished", "failed"  # the search's state
# Keys of the stock Oracle.get_state() that we derive from the trial records instead.
_DERIVED_STATE = ("ongoing_trials", "start_order", "end_order", "run_times", "retry_queue",
                  "tried_so_far", "id_to_hash", "display")


class JournalledState:
    """Mixin of LeasedOracle (before the stock oracle class): journal marks, snapshot, restore.

    Uses the oracle's ``journal``, ``_tickets``, ``meta``, ``lock``, ``lease_seconds`` and
    the search fields (``state``, ``reason``, ``fingerprint``, ``started_at``)."""

    # -- the stock Oracle's persistence, redirected to the journal -----------------------

    def _set_project_dir(self, directory, project_name):
        # The stock oracle keeps trial.json files in a local project dir; ours live in the
        # bucket (see journal.py). Keep the names only, create nothing.
        self._directory, self._project_name = directory, project_name

    # The stock oracle saves on every change; we note what changed and let the callers that
    # must answer durably (assign, end, reclaim) mark it urgent.
    def _save_trial(self, trial):
        self._mark([trial.trial_id], urgent=False)

    def save(self):
        self._mark(header=True, urgent=False)

    def reload(self):  # pragma: no cover - the chief calls restore() with bucket state
        raise NotImplementedError("LeasedOracle state is restored with restore()")

    def get_state(self):
        # Stock get_state() serialises every trial's hash and id; we persist those per trial.
        # Swap the growing collections out so building the header costs O(1) in trials.
        names = ("_tried_so_far", "_id_to_hash", "start_order", "end_order", "_run_times",
                 "_retry_queue", "ongoing_trials")
        saved = {n: getattr(self, n) for n in names}
        try:
            for n in names:
                setattr(self, n, type(saved[n])())
            state = super().get_state()
        finally:
            for n, v in saved.items():
                setattr(self, n, v)
        for key in _DERIVED_STATE:
            state.pop(key, None)
        return state

    def _mark(self, trial_ids=(), header: bool = False, *, urgent: bool = True) -> int:
        if self.journal is None:
            return -1
        ticket = self.journal.mark(trial_ids, header, urgent=urgent)
        if urgent:  # what an answer must wait for; a lazy mark is written whenever
            for tid in trial_ids:
                self._tickets[tid] = ticket
        return ticket

    # -- snapshot and restore --------------------------------------------------------------

    def snapshot(self, trial_ids, header: bool) -> tuple[dict | None, dict[str, dict]]:
        """JSON-ready copies of the given trials' records (and the header); lock held."""
        records = {}
        for tid in trial_ids:
            trial = self.trials.get(tid)
            if trial is not None:
                records[tid] = {"trial": trial.get_state(), "meta": _copy_meta(self.meta[tid])}
        return (self.header() if header else None), records

    def header(self) -> dict:
        return {"version": 1, "fingerprint": self.fingerprint, "oracle": self.get_state(),
                "search": {"state": self.state, "reason": self.reason,
                           "started_at": self.started_at}}

    def restore(self, header: dict, records: dict[str, dict]) -> None:
        """Rebuild the oracle from a header and per-trial records (see journal.Loaded)."""
        with self.lock:
            now = time.monotonic()
            for tid, record in records.items():
                self.trials[tid] = trial_module.Trial.from_state(record["trial"])
                self.meta[tid] = record["meta"]
            by_start = sorted(self.trials, key=lambda t: self.meta[t].get("start_seq") or 0)
            ongoing, retry, ended = {}, [], []
            for tid in by_start:
                trial, meta = self.trials[tid], self.meta[tid]
                attempts = meta.get("attempts") or []
                if trial.status == TrialStatus.RUNNING and attempts and \
                        attempts[-1]["ended"] is None:
                    worker = attempts[-1]["worker"]
                    if worker in ongoing:  # cannot happen; keep the newest, re-queue the other
                        retry.append(ongoing[worker])
                    ongoing[worker] = tid
                elif trial.status in (TrialStatus.INVALID, TrialStatus.RUNNING):
                    retry.append(tid)
                elif trial.status in (TrialStatus.COMPLETED, TrialStatus.FAILED):
                    ended.append(tid)
            ended.sort(key=lambda t: self.meta[t].get("end_seq") or 0)
            state = dict(header["oracle"])
            state.update({
                "ongoing_trials": ongoing,
                "start_order": by_start,
                "end_order": ended,
                # A released attempt (preempted) does not count against the retries.
                "run_times": {tid: sum(1 for a in self.meta[tid].get("attempts", [])
                                       if a["ended"] is not None and a["status"] != "released")
                              for tid in self.trials},
                "retry_queue": retry,
                "tried_so_far": [],
                "id_to_hash": {},
                "display": {"search_start": None, "trial_start": {}, "trial_number": {}},
            })
            self.set_state(state)
            for tid, trial in self.trials.items():
                h = self._compute_values_hash(trial.hyperparameters.values)
                self._tried_so_far.add(h)
                self._id_to_hash[tid] = h
            self.leases = {w: now + self.lease_seconds for w in ongoing}
            self.consecutive_failures = 0
            for tid in ended:
                failed = self.trials[tid].status == TrialStatus.FAILED
                self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
            self.completed = sum(1 for t in ended
                                 if self.trials[t].status == TrialStatus.COMPLETED)
            self._seq = max([0] + [m.get("start_seq") or 0 for m in self.meta.values()]
                            + [m.get("end_seq") or 0 for m in self.meta.values()])
            search = header.get("search", {})
            self.state = search.get("state", RUNNING)
            self.reason = search.get("reason", "")
            self.started_at = search.get("started_at", self.started_at)
            self.fingerprint = header.get("fingerprint", "")


def _copy_meta(meta: dict) -> dict:
    """A snapshot of a trial's bookkeeping (flat dicts and one list of flat dicts)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in meta.items()}
    out["attempts"] = [dict(a) for a in meta.get("attempts", ())]
    return out
