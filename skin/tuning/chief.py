"""The chief: keras-tuner's oracle behind gRPC, with leases, state in the bucket, clean endings.

``run_chief`` serves keras-tuner's ``OracleService`` on ``<bind address>:<port>``
(loopback unless told otherwise; the pod address in Kubernetes) from a thread
pool (``servicer.py``; stock keras-tuner serves one call at a time). A call without the
experiment's token, or from a worker id this experiment cannot have, is refused
before it reaches the oracle (``auth.py``); reports are checked as data
(``oracle.py``, ``checks.py``). Every call
that changes the search takes the oracle's lock, marks what changed for the
journal, releases the lock, and answers once the change is in the bucket
(group commit: one write carries every change made meanwhile).

The main thread waits for the search to end, waking ``min(1 s, lease / 5)`` to
reclaim expired leases. When the last trial ends it saves the state, writes
``tuner/result.json`` and ``tuner/best_hyperparameters.json``, stops the
server and, if ``SKIN_RETRAIN_JOB`` is set, starts the retrain Job.

Before it reads anything the chief takes the search's lock
(``tuner/oracle/lock.json``, :mod:`skin.tuning.lock`): a second chief waits
for it (Kubernetes) or exits 5 (a manual start). Every write of its state
goes through the lock's :class:`~skin.tuning.lock.Fence`; a chief that lost
its lock stops serving at once and exits 6 without writing.

A chief started again (killed, rescheduled) loads its state from
``tuner/oracle/`` and carries on: running trials keep their workers and get a
fresh lease. A chief started after the search ended does only what is left
(start the retrain Job) and exits with the search's code.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time

from skin.errors import (
    EXIT_OK,
    EXIT_SEARCH_FAILED,
    ConfigError,
    FencedError,
    RetryableError,
    SearchFailedError,
    SkinError,
    exits,
)
from skin.infra.artifacts import best_uri, lock_uri, oracle_uri, result_uri
from skin.infra.documents import SearchResult
from skin.tuning import auth
from skin.tuning.hooks import ChiefHooks, Listener
from skin.tuning.journal import Journal, OracleStore
from skin.tuning.lock import ChiefLock, Fence, should_wait
from skin.tuning.results import build_best, build_result, read_outcome
from skin.tuning.servicer import RPC_THREADS, make_servicer, serve

log = logging.getLogger("skin.tuning")





class ChiefListener(Listener):
    """Turns oracle events into log lines for a human and metrics for Prometheus."""

    def __init__(self, metrics: ChiefHooks | None = None, max_epochs: int = 0):
        self.metrics = metrics if metrics is not None else ChiefHooks()
        self.max_epochs = max_epochs
        self.best: tuple[float, str] | None = None

    def trial_started(self, oracle, trial, attempt) -> None:
        values = trial.hyperparameters.values
        extra = ""
        if "tuner/epochs" in values:
            extra = f", epochs {values.get('tuner/initial_epoch', 0)}->{values['tuner/epochs']}"
            if values.get("tuner/trial_id"):
                extra += f" from trial {values['tuner/trial_id']}"
        log.info("trial %s started on %s (attempt %d%s)", trial.trial_id, attempt["worker"],
                 attempt["n"], extra)
        self.metrics.trial_started(attempt["worker"])

    def trial_ended(self, oracle, trial, attempt) -> None:
        worker, duration = attempt["worker"], attempt["ended"] - attempt["started"]
        allowed = oracle.max_retries_per_trial + 1
        requeued = trial.status == "INVALID"
        fate = "re-queued" if requeued else "no retries left"
        if attempt["status"] == "completed":
            score = trial.score
            better = self.best is None or oracle.objective.better_than(score, self.best[0])
            if better:
                self.best = (score, trial.trial_id)
            log.info("trial %s completed on %s: %s=%.4f after %d epochs in %.1f s "
                     "(best %.4f, trial %s; %s)", trial.trial_id, worker, oracle.objective.name,
                     score, attempt["epochs"], duration, self.best[0], self.best[1],
                     self._progress(oracle))
            status = "completed"
        elif attempt["status"] == "released":
            log.info("trial %s released by %s after %d epochs (preempted); re-queued to resume "
                     "at epoch %d, not counted as a failed attempt", trial.trial_id, worker,
                     attempt["epochs"], attempt["epochs"] + 1)
            status = "released"
        elif attempt["status"] == "reclaimed":
            log.warning("trial %s reclaimed from %s: no report for %g s (lease); attempt %d of %d "
                        "failed, %s", trial.trial_id, worker, oracle.lease_seconds, attempt["n"],
                        allowed, fate)
            status = "reclaimed"
        else:
            log.warning("trial %s failed on %s after %.1f s (attempt %d of %d, %s): %s",
                        trial.trial_id, worker, duration, attempt["n"], allowed, fate,
                        attempt["reason"] or "no message")
            status = "invalid" if requeued else "failed"
        self.metrics.trial_ended(status, duration, trial.score if status == "completed" else None,
                                 worker)
        self._report_progress(oracle)

    def worker_report(self, worker: str, trial, epochs_done: int) -> None:
        budget = trial.hyperparameters.values.get("tuner/epochs", self.max_epochs)
        self.metrics.worker_report(worker, epoch=epochs_done, epochs_budget=int(budget))

    def worker_alive(self, worker: str) -> None:  # a heartbeat: seen, no progress
        self.metrics.worker_report(worker)

    def trial_stopped_early(self, trial_id: str) -> None:
        self.metrics.trial_stopped_early()

    def confirmation_started(self, trial_id: str) -> None:
        self.metrics.confirmation_started()

    def search_ended(self, oracle) -> None:
        if oracle.state == "failed":
            log.error("search failed: %s", oracle.reason)
        else:
            log.info("search finished: %s (%s)", oracle.reason, self._progress(oracle))

    def _progress(self, oracle) -> str:
        total = oracle.total_estimate()
        return f"{oracle.trials_done()}/{total if total else '?'} trials done"

    def _report_progress(self, oracle) -> None:
        done, total = oracle.trials_done(), oracle.total_estimate()
        eta = None
        if done and total and total > done:
            eta = (time.time() - oracle.started_at) / done * (total - done)
        self.metrics.set_search_progress(done, total, eta)


def populate_space(oracle, hypermodel) -> None:
    """Let keras-tuner build the hypermodel until every conditional hyperparameter is known."""
    import keras
    import keras_tuner

    from skin.tuning.tuner import stock_distribution_off

    with tempfile.TemporaryDirectory(prefix="skin-space-") as tmp, stock_distribution_off():
        keras_tuner.Tuner(oracle=oracle, hypermodel=hypermodel, directory=tmp,
                          project_name="space", tuner_id="chief", overwrite=True)
    keras.backend.clear_session()


def start_retrain(runtime) -> int:
    """Un-suspend the retrain Job when one is configured; the exit code that follows.

    A failure that a retry may cure exits 75, so the Job restarts the chief, which finds
    the search ended and tries again; a misconfiguration skin.infra.kube reports as such (no
    such Job, no permission: ConfigError) exits 2. The search result stays either way.
    """
    if not runtime.retrain_job:
        return EXIT_OK
    from skin.infra import kube

    try:
        kube.unsuspend_job(runtime.namespace, runtime.retrain_job)
    except Exception as e:  # typed here, its exit code decided where the chief ends
        log.error("could not start the retrain Job %s/%s: %s (the search result stays in the "
                  "bucket)", runtime.namespace, runtime.retrain_job, e)
        if isinstance(e, SkinError):
            raise
        raise RetryableError(f"retrain Job {runtime.namespace}/{runtime.retrain_job}: "
                             f"{type(e).__name__}: {e}") from e
    log.info("started the retrain Job %s/%s", runtime.namespace, runtime.retrain_job)
    return EXIT_OK


@exits("chief")
def run_chief(ctx) -> int:
    """Serve the oracle until the search ends; the process exit code (skin.errors).
    ``ctx.metrics``: the chief's hooks; None means the no-op ChiefHooks.

    SIGTERM (preemption, drain, a new chief pod) stops serving at the next tick; the
    journal is flushed and the chief exits EXIT_RELEASED; the next chief resumes.
    """
    from skin.tuning.preempt import Preemption

    metrics = ctx.metrics if ctx.metrics is not None else ChiefHooks()
    preemption = Preemption("chief")
    with preemption, preemption.deferred():
        return _run_chief(ctx.exp, ctx.runtime, ctx.storage, metrics, ctx.hypermodel,
                          preemption)


def _run_chief(exp, runtime, storage, metrics, make_hypermodel, preemption=None) -> int:
    if runtime.role != "chief":
        raise ConfigError(f"KERASTUNER_TUNER_ID: {runtime.tuner_id!r} is not valid for the chief; "
                          "expected 'chief'")
    auth.check_chief_settings(runtime, runtime.bind_hosts)  # no open oracle: exit 2

    servers: list = []  # stopped at once when the lock is lost

    def lost(reason: str) -> None:
        for server in servers:
            server.stop(grace=0)

    lock = ChiefLock(storage, lock_uri(exp), exp.chief.lock_seconds,
                     metrics=metrics, on_lost=lost)
    metrics.chief_lock(False)
    lock.acquire(wait=should_wait(exp.chief.on_lock_held)).start()
    try:
        return _serve(exp, runtime, storage, metrics, make_hypermodel, lock, servers, preemption)
    except RetryableError as e:
        if lock.lost.is_set():  # the journal stopped on the lost lock: say why
            raise FencedError(f"this chief lost its lock ({lock.reason}); it stopped "
                              f"serving ({e})") from None
        raise
    finally:
        lock.release()


def _serve(exp, runtime, storage, metrics, make_hypermodel, lock: ChiefLock, servers: list,
           preemption=None) -> int:
    from skin.tuning.fingerprint import fingerprint_matches
    from skin.tuning.oracle import make_oracle
    from skin.tuning.oracle_state import FAILED

    fence = Fence(storage, lock)
    outcome = read_outcome(storage, exp)
    if outcome is not None:
        log.info("the search of %s already ended (%s; %s): nothing to tune. A new search needs "
                 "a new experiment name.", exp.name, outcome["outcome"], result_uri(exp))
        if outcome["outcome"] == "failed":
            raise SearchFailedError(f"the search failed: {outcome['reason']}")
        return start_retrain(runtime)

    port = runtime.oracle_port or exp.chief.oracle_port
    oracle = make_oracle(exp)
    if oracle.confirm is not None and exp.search.confirm.folds:  # read once, when it starts
        from skin.data.dataset import staged_folds

        oracle.confirm.folds_source = lambda: staged_folds(storage, exp.data_uri)
    store = OracleStore(storage, oracle_uri(exp), fence=fence)
    loaded = store.load()
    if loaded.header is not None:
        if not fingerprint_matches(exp, loaded.header.get("fingerprint")):
            raise ConfigError(
                f"search: the saved search in {store.prefix} was started with different search "
                "settings (tuner, objective, budget, space, fixed, seed, early stopping, confirm "
                "or backbone); use a new experiment name or delete that folder")
        oracle.restore(loaded.header, loaded.records)
        counts: dict[str, int] = {}
        for t in oracle.trials.values():
            counts[(t.status or "?").lower()] = counts.get((t.status or "?").lower(), 0) + 1
        log.info("resuming the search from %s: %d trials %s, %d journal batches replayed",
                 store.prefix, len(oracle.trials), counts or "", loaded.batches)
    else:
        try:
            populate_space(oracle, make_hypermodel())
        except Exception as e:  # nothing can run: end the search, tell the workers
            reason = f"the search space cannot be built: {type(e).__name__}: {e}"
            log.exception("search failed: %s", reason)
            fence.write_json(result_uri(exp), SearchResult(
                outcome="failed", reason=reason, tuner=exp.search.tuner,
                objective=oracle.objective.name,
                direction=oracle.objective.direction).to_json(), "result")
            raise SearchFailedError(reason) from None
        log.info("new search: %s over %d hyperparameters, objective %s (%s)",
                 exp.search.tuner, len(oracle.hyperparameters.space), oracle.objective.name,
                 oracle.objective.direction)

    listener = ChiefListener(metrics, exp.search.max_epochs)
    oracle.listener = listener
    journal = Journal(store, oracle.lock, oracle.snapshot, loaded=loaded).start()
    oracle.journal = journal
    with oracle.lock:
        ticket = oracle._mark(header=True)
    journal.wait(ticket)
    with oracle.lock:  # a chief killed between the last trial and the result files
        if oracle.state == "running" and not oracle.ongoing_trials and \
                not oracle._retry_queue and oracle.exhausted():
            oracle._finish("finished", "all trials ended")
        elif oracle.state != "running":
            oracle.done.set()

    # TensorFlow and Keras leave ~10^6 long-lived objects; a full garbage collection walks
    # them all and pauses every RPC for 100+ ms. Freeze them out of the collector's sight.
    gc.collect()
    gc.freeze()
    if preemption is not None:
        preemption.check()  # SIGTERM while loading: nothing served yet, nothing to flush
    servicer = make_servicer(oracle, metrics, workers=exp.workers)
    lock.check()
    server = serve(servicer, port, runtime.bind_address, token=runtime.oracle_token,
                   tls_dir=runtime.oracle_tls_dir, metrics=metrics)
    servers.append(server)
    total = oracle.total_estimate()
    log.info("oracle serving on %s port %d (%s, %s): %s, ~%s trials, lease %g s, %d threads",
             ", ".join(runtime.bind_hosts), port,
             "token required" if runtime.oracle_token else "NO token",
             "TLS" if runtime.oracle_tls_dir else "no TLS", exp.search.tuner, total or "?",
             oracle.lease_seconds, RPC_THREADS)
    listener._report_progress(oracle)
    tick = min(1.0, oracle.lease_seconds / 5)
    try:
        while not oracle.done.wait(tick):
            lock.check()
            if preemption is not None and preemption.requested.is_set():
                # Answers already given are durable (each waited for its journal batch);
                # what rides lazily (epoch reports) is flushed before leaving.
                server.stop(grace=0.5).wait()
                journal.flush(timeout=10.0)  # inside the grace period; else exit 75, unsaved
                journal.stop()
                log.info("chief: journal flushed after SIGTERM; %d trials running stay "
                         "leased to their workers for the next chief",
                         len(oracle.ongoing_trials))
                preemption.check()
            oracle.reclaim_expired()
            if isinstance(journal.error, FencedError):
                raise journal.error
            if journal.error is not None:
                raise RetryableError(f"oracle state cannot be saved: {journal.error}")
        journal.flush()
        fence.write_json(result_uri(exp), build_result(oracle, exp).to_json(), "result")
        best = build_best(oracle, exp)
        if best is not None and oracle.state != FAILED:
            fence.write_current(best_uri(exp), best.to_json(), "result")
            log.info("best trial %s: %s=%.4f; wrote %s", best.trial_id, best.objective,
                     best.score, best_uri(exp))
    finally:
        server.stop(grace=0 if lock.lost.is_set() else 0.5).wait()
    # Fold the journal into one object per trial, if that is quick; the journal alone is a
    # complete state (result.json above is what everyone reads), so the chief need not wait.
    if journal.error is None and not journal.compact(timeout=1.0):
        log.info("left the last journal batches uncompacted (a restarted chief replays them)")
    journal.stop()
    metrics.search_finished()
    if oracle.state == FAILED:
        log.error("chief exits %d: the search failed (summary in %s)", EXIT_SEARCH_FAILED,
                  result_uri(exp))
        return EXIT_SEARCH_FAILED
    return start_retrain(runtime)
