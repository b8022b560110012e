"""keras-tuner's oracles with trial leases, per-trial persistence and clean endings.

:class:`LeasedOracle` is mixed in front of a stock oracle class
(``HyperbandOracle``, ``BayesianOptimizationOracle``, ``RandomSearchOracle``);
the search algorithm stays keras-tuner's. What the mixin changes:

- **Leases.** A trial handed to worker ``tuner3`` is leased to it for
  ``lease_seconds``; every report renews it. :meth:`reclaim_expired` ends an
  expired attempt as failed (keras-tuner's INVALID: re-queued while retries
  remain, else FAILED) and logs the worker and the trial.
- **Ownership.** Reports and endings name the worker and the attempt; one that
  no longer holds the trial gets :class:`LeaseLost`, so a reclaimed trial is
  never ended twice. Ending the same attempt twice is harmless (a retried RPC).
- **Reports are data.** Metrics must be finite and in range and a completed
  trial must carry the objective (``checks.py``, also the endings and the space); an ending keeps the
  hyperparameters the chief issued (one that sends others is refused); a
  worker's ``UpdateSpace`` may only confirm the chief's space. A refused call
  raises :class:`Refused` before anything changes.
- **Persistence.** Each change marks what it touched for the journal instead of
  rewriting all state (:class:`~skin.tuning.oracle_state.JournalledState`).
- **Releases.** A preempted worker hands its trial back (:meth:`release`): it
  is re-queued at once and resumes from its last finished epoch; a release is
  neither a failed attempt nor a consecutive failure.
- **Endings.** Too many consecutive failures ends the search as ``failed``
  with a reason, instead of raising inside a gRPC handler. The search is
  ``finished`` as soon as nothing runs and nothing more can be created; a
  worker asking while others still run gets IDLE, not STOPPED, so it stays
  around to pick up a trial reclaimed from a dead worker.

Every public method takes :attr:`lock` itself; the servicer waits for
durability (:meth:`Journal.wait`) after the lock is released.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import keras_tuner
from keras_tuner.src.engine import trial as trial_module
from keras_tuner.src.tuners.bayesian import BayesianOptimizationOracle
from keras_tuner.src.tuners.hyperband import HyperbandOracle
from keras_tuner.src.tuners.randomsearch import RandomSearchOracle

from skin.errors import ConfigError
from skin.tuning import checks
from skin.tuning.confirm import Confirmation
from skin.tuning.fingerprint import search_fingerprint
from skin.tuning.hooks import Listener
from skin.tuning.oracle_state import FAILED, FINISHED, RUNNING, JournalledState, TrialStatus
from skin.tuning.protocol import LeaseLost, Refused, SearchStopped
from skin.tuning.stopping import MedianStopping, stopped_reply

log = logging.getLogger("skin.tuning")




@dataclass
class Assignment:
    trial: Any  # keras_tuner Trial
    attempt: int = 0
    ticket: int = -1  # journal batch to wait for; -1: nothing to wait for


def objective_for(exp) -> keras_tuner.Objective:
    return keras_tuner.Objective(exp.search.objective, exp.search.direction)


class LeasedOracle(JournalledState):
    """Mixin: put it first in the bases of a keras-tuner oracle class."""

    def __init__(self, *, lease_seconds: float = 300.0, **oracle_kwargs):
        super().__init__(**oracle_kwargs)
        self.verbose = 0  # the stock Display prints tables to stdout; the listener logs instead
        self.lease_seconds = float(lease_seconds)
        self.lock = threading.RLock()
        self.done = threading.Event()
        self.state, self.reason = RUNNING, ""
        self.fingerprint = ""
        self.listener: Listener = Listener()
        self.journal = None  # skin.tuning.journal.Journal, set by the chief
        self.stopping = None  # skin.tuning.stopping.MedianStopping (search.early_stopping)
        self.confirm = None  # skin.tuning.confirm.Confirmation (search.confirm)
        self.meta: dict[str, dict] = {}  # trial_id -> {"attempts": [...], "start_seq", "end_seq"}
        self.leases: dict[str, float] = {}  # tuner_id -> monotonic deadline
        self.consecutive_failures = 0
        self.completed = 0
        self._seq = 0
        self._tickets: dict[str, int] = {}  # trial_id -> batch carrying its latest change
        self.started_at = time.time()

    def _check_consecutive_failures(self):
        # Stock raises RuntimeError here, inside a gRPC handler; we count in _after_end.
        pass

    def _retry(self, trial):
        if trial.status != TrialStatus.INVALID:
            return False
        runs, allowed = self._run_times[trial.trial_id], self.max_retries_per_trial + 1
        if runs >= allowed:
            trial.status = TrialStatus.FAILED
            return False
        log.info("trial %s: attempt %d of %d failed; re-queued", trial.trial_id, runs, allowed)
        self._retry_queue.append(trial.trial_id)
        return True

    # -- bookkeeping -----------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def attempt_of(self, trial_id: str) -> dict:
        return self.meta[trial_id]["attempts"][-1]

    def holder(self, trial_id: str) -> str | None:
        attempts = self.meta.get(trial_id, {}).get("attempts") or []
        if attempts and attempts[-1]["ended"] is None:
            return attempts[-1]["worker"]
        return None

    def exhausted(self) -> bool:
        """True when no more trials will be created (checked when nothing runs): the
        algorithm's and then the confirmation trials (search.confirm)."""
        return self._algorithm_exhausted() and (self.confirm is None or self.confirm.done(self))

    def _algorithm_exhausted(self) -> bool:
        return bool(self.max_trials) and len(self.trials) >= self.max_trials

    def total_estimate(self) -> int | None:
        return self.max_trials or None

    def trials_done(self) -> int:
        return len(self.end_order)

    def _check_owner(self, trial_id: str, worker: str | None, attempt: int | None):
        trial = self.trials.get(trial_id)
        if trial is None:
            raise LeaseLost(f"trial {trial_id} is unknown to the chief")
        holder = self.holder(trial_id)
        current = self.meta[trial_id]["attempts"][-1]["n"] if self.meta[trial_id]["attempts"] \
            else 0
        if holder is None or worker != holder or self.ongoing_trials.get(worker) is not trial \
                or (attempt and attempt != current):
            raise LeaseLost(f"trial {trial_id} (attempt {attempt or '?'}) is no longer held by "
                            f"{worker}; holder: {holder or 'none'} (attempt {current})")
        return trial, worker

    def _finish(self, state: str, reason: str) -> None:
        if self.state != RUNNING:
            return
        if state == FINISHED and not self.completed:
            state, reason = FAILED, f"no trial completed ({reason})"
        self.state, self.reason = state, reason
        self._mark(header=True)
        self.listener.search_ended(self)
        self.done.set()

    # -- what the servicer calls ------------------------------------------------------

    def assign(self, tuner_id: str) -> Assignment:
        """The trial for ``tuner_id``: the one it holds, a re-queued one, or a new one."""
        with self.lock:
            if self.state != RUNNING:
                return Assignment(self._empty_trial(TrialStatus.STOPPED))
            now = time.monotonic()
            held = self.ongoing_trials.get(tuner_id)
            if held is not None:  # a restarted worker (or a retried RPC) gets its trial back
                self.leases[tuner_id] = now + self.lease_seconds
                return Assignment(held, self.attempt_of(held.trial_id)["n"],
                                  self._tickets.get(held.trial_id, -1))
            trial = self.create_trial(tuner_id)  # stock: retry queue first, then the algorithm
            if trial.status == TrialStatus.STOPPED and self.confirm is not None:
                trial = self.confirm.next_trial(self, tuner_id) or trial  # then confirmations
            if trial.status == TrialStatus.RUNNING:
                meta = self.meta.setdefault(trial.trial_id, {"attempts": [],
                                                             "start_seq": self._next_seq(),
                                                             "end_seq": None, "epochs": 0})
                attempt = {"n": len(meta["attempts"]) + 1, "worker": tuner_id,
                           "started": time.time(), "ended": None, "status": None,
                           "reason": None, "epochs": 0}
                meta["attempts"].append(attempt)
                self.leases[tuner_id] = now + self.lease_seconds
                ticket = self._mark([trial.trial_id], header=True)
                self.listener.trial_started(self, trial, attempt)
                return Assignment(trial, attempt["n"], ticket)
            if trial.status == TrialStatus.STOPPED:
                if self.ongoing_trials or self._retry_queue:
                    # Others still run; one may be reclaimed and need this worker.
                    self.tuner_ids.add(tuner_id)
                    return Assignment(self._empty_trial(TrialStatus.IDLE))
                self._finish(FINISHED, "the search space is exhausted" if not self.exhausted()
                             else "all trials ended")
            return Assignment(trial)

    def report(self, trial_id: str, worker: str | None, attempt: int | None, metrics: dict,
               step: int, *, progress_only: bool) -> Any:
        """A worker's report: renews the lease; a final report also records the metrics."""
        with self.lock:
            if self.state == FAILED:
                raise SearchStopped(self.state, self.reason)
            trial, worker = self._check_owner(trial_id, worker, attempt)
            try:
                metrics = checks.check_metrics(metrics)
            except ValueError as e:
                raise Refused("report", f"trial {trial_id}: {e}") from None
            self.leases[worker] = time.monotonic() + self.lease_seconds
            meta = self.meta[trial_id]
            meta["epochs"] = meta["attempts"][-1]["epochs"] = int(step) + 1
            if progress_only and meta["attempts"][-1].get("first_epoch") is None:
                meta["attempts"][-1]["first_epoch"] = int(step)  # where this attempt resumed
            if progress_only:
                meta["last"] = {k: float(v) for k, v in metrics.items()}
                if self.stopping is not None and self.stopping.observe(self, trial_id, metrics,
                                                                       step):
                    trial = stopped_reply(trial)  # the reply says STOPPED: end it now
            else:
                self.update_trial(trial_id, metrics, step=step)  # stock: registers the metrics
            # Nobody waits on a report: it rides with the next write (an ending carries the
            # final metrics again, so a chief restart loses nothing that matters).
            self._mark([trial_id], urgent=False)
            self.listener.worker_report(worker, trial, int(step) + 1)
            return trial

    def heartbeat(self, trial_id: str, worker: str | None, attempt: int | None) -> Any:
        """A worker still training ``trial_id`` mid-epoch: renews its lease, writes nothing.

        An epoch longer than the lease (a big model, a slow node) would otherwise
        lose its trial although the worker is alive; :class:`LeaseLost` when the
        trial was already given away.
        """
        with self.lock:
            if self.state == FAILED:
                raise SearchStopped(self.state, self.reason)
            trial, worker = self._check_owner(trial_id, worker, attempt)
            self.leases[worker] = time.monotonic() + self.lease_seconds
            self.listener.worker_alive(worker)
            return trial

    def release(self, trial_id: str, worker: str | None, attempt: int | None,
                epochs: int, first_epoch: int | None = None) -> int:
        """A preempted worker hands its trial back (``epochs`` finished and in the bucket).

        The attempt ends as ``released``; the trial goes back to the queue at once and the
        next worker resumes it from that epoch. Unlike a reclaim or a failure it counts
        neither against ``max_trial_retries`` nor toward ``max_consecutive_failed_trials``.
        Returns the journal ticket to wait for; a retried release is answered again.
        """
        with self.lock:
            meta = self.meta.get(trial_id)
            if meta and meta["attempts"]:
                last = meta["attempts"][-1]
                if last["status"] == "released" and last["worker"] == (worker or last["worker"]) \
                        and (not attempt or attempt == last["n"]):
                    return self._tickets.get(trial_id, -1)  # the same release again
            if self.state == FAILED:
                raise SearchStopped(self.state, self.reason)
            trial, worker = self._check_owner(trial_id, worker, attempt)
            self._note_epochs(trial_id, None if first_epoch is None else (first_epoch, epochs))
            self.leases.pop(worker, None)
            self.ongoing_trials.pop(worker, None)
            # Queued like a trial to retry (stock create_trial takes the queue first), but
            # _run_times is not increased: a preemption is not an attempt that failed.
            trial.status = TrialStatus.INVALID
            trial.message = f"released by {worker} (preempted)"
            self._retry_queue.append(trial_id)
            meta = self.meta[trial_id]
            current = meta["attempts"][-1]
            current.update(ended=time.time(), status="released", reason=trial.message,
                           epochs=max(0, int(epochs)))
            meta["epochs"] = current["epochs"]
            ticket = self._mark([trial_id], header=True)
            self.listener.trial_ended(self, trial, current)
            return ticket

    def end(self, trial, worker: str | None, attempt: int | None,
            epochs: tuple[int, int] | None = None) -> int:
        """End the worker's attempt of ``trial`` (a Trial from the worker); returns the ticket.

        ``epochs``: (epoch the worker resumed at, epochs finished), as the worker counted
        them; they fill in what epoch reports lost while the chief was away did not."""
        with self.lock:
            trial_id = trial.trial_id
            meta = self.meta.get(trial_id)
            if meta and meta["attempts"]:
                last = meta["attempts"][-1]
                if last["ended"] is not None and last["status"] != "reclaimed" and \
                        last["worker"] == (worker or last["worker"]) and \
                        (not attempt or attempt == last["n"]):
                    return self._tickets.get(trial_id, -1)  # the same ending again: a retried RPC
            if self.state == FAILED:
                raise SearchStopped(self.state, self.reason)
            current, worker = self._check_owner(trial_id, worker, attempt)
            checks.check_ending(trial, current, self.objective.name, self.hyperparameters)
            self._note_epochs(trial_id, epochs)
            # The chief's own trial, with the caller's status, message and (checked) metrics:
            # stock end_trial would take the caller's hyperparameters and merge them into the space.
            ending = trial_module.Trial(current.hyperparameters, trial_id=trial_id,
                                        status=trial.status, message=trial.message)
            objective = self.objective.name
            if trial.status == TrialStatus.COMPLETED:
                if trial.metrics.exists(objective):
                    current.metrics = trial.metrics  # the worker's final metrics win
                if not current.metrics.exists(objective) or \
                        current.metrics.get_best_value(objective) is None:
                    ending.status = TrialStatus.INVALID
                    ending.message = f"the objective {objective!r} was not reported"
            self._end_attempt(ending, worker, None)
            return self._tickets.get(trial_id, -1)

    def _note_epochs(self, trial_id: str, epochs: tuple[int, int] | None) -> None:
        if epochs is None:
            return
        first, last = (int(e) for e in epochs)
        meta = self.meta[trial_id]
        attempt = meta["attempts"][-1]
        if last > first:  # the worker's count wins over the first epoch report that arrived
            attempt["first_epoch"] = first
        if last >= attempt.get("epochs", 0):
            meta["epochs"] = attempt["epochs"] = last

    def confirm_space(self, hps) -> None:
        """A worker's UpdateSpace: every hyperparameter it sends must be the chief's own, the
        same; anything new or different is :class:`Refused`, never merged."""
        with self.lock:
            checks.check_space(self.get_space(), hps)

    def reclaim_expired(self, now: float | None = None) -> list[tuple[str, str]]:
        """End every attempt whose lease has expired; returns ``[(trial_id, worker)]``."""
        now = time.monotonic() if now is None else now
        reclaimed = []
        with self.lock:
            if self.state != RUNNING:
                return reclaimed
            for worker, deadline in list(self.leases.items()):
                if deadline > now:
                    continue
                trial = self.ongoing_trials.get(worker)
                self.leases.pop(worker, None)
                if trial is None:
                    continue
                copy = trial_module.Trial(trial.hyperparameters, trial_id=trial.trial_id,
                                          status=TrialStatus.INVALID,
                                          message=f"lease expired: no report from {worker} "
                                                  f"for {self.lease_seconds:g} s")
                self._end_attempt(copy, worker, "reclaimed")
                reclaimed.append((trial.trial_id, worker))
        return reclaimed

    def _end_attempt(self, trial, worker: str, how: str | None) -> None:
        trial_id = trial.trial_id
        self.end_trial(trial)  # stock: score, retry or final status, ongoing bookkeeping
        current = self.trials[trial_id]
        self.leases.pop(worker, None)
        self.ongoing_trials.pop(worker, None)  # stock pops by trial id; make sure
        meta = self.meta[trial_id]
        attempt = meta["attempts"][-1]
        attempt["ended"] = time.time()
        attempt["status"] = how or ("completed" if current.status == TrialStatus.COMPLETED
                                    else "failed")
        attempt["reason"] = _last_line(current.message) if current.status != \
            TrialStatus.COMPLETED else None
        if current.status in (TrialStatus.COMPLETED, TrialStatus.FAILED):
            meta["end_seq"] = self._next_seq()
        self._mark([trial_id], header=True)
        self.listener.trial_ended(self, current, attempt)
        self._after_end(current)

    def _after_end(self, trial) -> None:
        if trial.status == TrialStatus.FAILED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.max_consecutive_failed_trials:
                self._finish(FAILED, (
                    f"{self.consecutive_failures} consecutive trials failed "
                    f"(search.max_consecutive_failed_trials = "
                    f"{self.max_consecutive_failed_trials}); last: trial {trial.trial_id}: "
                    f"{_last_line(trial.message) or 'no message'}"))
                return
        elif trial.status == TrialStatus.COMPLETED:
            self.consecutive_failures = 0
            self.completed += 1
        if not self.ongoing_trials and not self._retry_queue and self.exhausted():
            self._finish(FINISHED, "all trials ended")

    def _empty_trial(self, status: str):
        return trial_module.Trial(self.get_space(), trial_id="", status=status)

class LeasedHyperbandOracle(LeasedOracle, HyperbandOracle):
    def _algorithm_exhausted(self) -> bool:
        self._remove_completed_brackets()
        return (not self._brackets and self._current_bracket == 0
                and self._current_iteration + 1 >= self.hyperband_iterations)

    def total_estimate(self) -> int | None:
        per_iteration = sum(self._get_size(b, r) for b in range(self._get_num_brackets())
                            for r in range(self._get_num_rounds(b)))
        return per_iteration * int(self.hyperband_iterations)


class LeasedRandomSearchOracle(LeasedOracle, RandomSearchOracle):
    pass


class LeasedBayesianOracle(LeasedOracle, BayesianOptimizationOracle):
    pass


_STOCK = {"hyperband": HyperbandOracle, "random": RandomSearchOracle,
          "bayesian": BayesianOptimizationOracle}
_LEASED = {"hyperband": LeasedHyperbandOracle, "random": LeasedRandomSearchOracle,
           "bayesian": LeasedBayesianOracle}


def make_oracle(exp, *, leased: bool = True):
    """The experiment's oracle: leased (the chief) or stock (a worker's local copy)."""
    s = exp.search
    hps = keras_tuner.HyperParameters()
    for name, value in s.fixed.items():
        hps.Fixed(name, value)
    for name, spec in s.space.items():  # search.space's fixed ones, like search.fixed
        if spec["type"] == "fixed":
            hps.Fixed(name, spec["value"])
    kwargs: dict[str, Any] = dict(
        objective=objective_for(exp), seed=exp.data.seed, hyperparameters=hps,
        allow_new_entries=True, tune_new_entries=True,
        max_retries_per_trial=s.max_trial_retries,
        max_consecutive_failed_trials=s.max_consecutive_failed_trials)
    if s.tuner == "bayesian":
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:  # keras-tuner's optional dependency
            raise ConfigError("search.tuner: 'bayesian' is not available here; keras-tuner's "
                              "Bayesian optimisation needs scikit-learn (pip install "
                              "scikit-learn), or choose hyperband or random")
    if s.tuner == "hyperband":
        kwargs.update(max_epochs=s.max_epochs, factor=s.hyperband_factor,
                      hyperband_iterations=s.hyperband_iterations)
    elif s.tuner in ("random", "bayesian"):
        kwargs.update(max_trials=s.max_trials)
    else:  # config.py validates the choice; this is a guard against a new one
        raise ConfigError(f"search.tuner: {s.tuner!r} is not valid; expected one of "
                          + ", ".join(_STOCK))
    if leased:
        oracle = _LEASED[s.tuner](lease_seconds=s.lease_seconds, **kwargs)
        oracle.fingerprint = search_fingerprint(exp)
        oracle.stopping = MedianStopping.from_experiment(exp, oracle.objective)
        oracle.confirm = Confirmation.from_experiment(exp)
        return oracle
    oracle = _STOCK[s.tuner](**kwargs)
    oracle.verbose = 0
    return oracle


def _last_line(message: str | None) -> str:
    lines = [ln.strip() for ln in (message or "").strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""
