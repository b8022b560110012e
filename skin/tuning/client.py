"""A worker's line to the chief: keras-tuner's OracleClient interface, with backoff and endings.

It offers what keras-tuner's ``Tuner`` expects of ``self.oracle`` (``objective``,
``create_trial``, ``update_trial``, ``end_trial``, ``get_trial``, ...) over the
stock gRPC service, and adds what the stock client lacks:

- it names the worker and the attempt on every call (``protocol.py``) and
  carries the experiment's token (``authorization: Bearer``), over TLS when
  ``tls_dir`` holds the chief's CA (``auth.py``); a chief that refuses this
  worker (``UNAUTHENTICATED``, ``PERMISSION_DENIED``) is a ``ConfigError``
  (exit 2): retrying cannot cure a wrong token or id;
- a chief that does not answer (starting, restarting, gone) is retried with
  exponential backoff for at most ``patience_s``; meanwhile, every failed try
  looks at ``tuner/result.json`` in the bucket, so a worker whose chief has
  finished and exited learns it from there instead of waiting;
- the end of the search and a lost lease arrive as exceptions:
  :class:`SearchOver` (finished: exit 0), ``SearchFailedError`` (exit 4),
  :class:`LeaseLostError` (drop the trial, ask for another).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import grpc

from skin.errors import ConfigError, RetryableError, SearchFailedError
from skin.tuning import auth
from skin.tuning import protocol as wire

log = logging.getLogger("skin.tuning")

_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
CHANNEL_OPTIONS = [
    # The default reconnect backoff grows to 120 s: a chief back after a restart would sit
    # unused for minutes. Cap it near our own retry interval.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 << 20),
]


class SearchOver(Exception):
    """The search finished; the worker is done."""


class LeaseLostError(Exception):
    """The chief gave this worker's trial away (its lease expired)."""


class ChiefClient:
    def __init__(self, address: str, worker_id: str, local_oracle, *, patience_s: float,
                 outcome: Callable[[], dict | None] | None = None, call_timeout_s: float = 60.0,
                 max_backoff_s: float = 5.0, token: str = "", tls_dir: str = ""):
        from keras_tuner.src import protos

        self.address = address
        self.worker_id = worker_id
        self._oracle = local_oracle
        self._outcome = outcome
        self.patience_s = patience_s
        self.call_timeout_s = call_timeout_s
        self.max_backoff_s = max_backoff_s
        self._service = protos.get_service()
        self._auth = (auth.bearer(token),) if token else ()
        self.channel = grpc.secure_channel(address, auth.channel_credentials(tls_dir),
                                           options=CHANNEL_OPTIONS) if tls_dir else \
            grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = protos.get_service_grpc().OracleStub(self.channel)
        self.attempts: dict[str, int] = {}
        self.answered = False  # has the chief ever answered this client?
        self.search_state = "running"
        self.multi_worker, self.should_report = False, True  # what keras-tuner's Tuner reads
        self.stop_requested: Callable[[], bool] | None = None  # SIGTERM: stop retrying

    # keras-tuner's Tuner reads these from its oracle
    @property
    def objective(self):
        return self._oracle.objective

    @property
    def max_trials(self):
        return self._oracle.max_trials

    def close(self) -> None:
        self.channel.close()

    # -- the call, with retries ----------------------------------------------------------

    def _metadata(self, trial_id: str | None = None, **extra: str):
        md = [*self._auth, (wire.WORKER, self.worker_id)]
        if trial_id and trial_id in self.attempts:
            md.append((wire.ATTEMPT, str(self.attempts[trial_id])))
        md.extend(extra.items())
        return tuple(md)

    def _call(self, method: str, request, metadata, *, patient: bool = True,
              timeout: float | None = None):
        """One RPC; returns (response, trailing metadata dict)."""
        deadline = time.monotonic() + self.patience_s
        delay, tries, last_note = 0.25, 0, 0.0
        rpc = getattr(self.stub, method)
        while True:
            tries += 1
            try:
                response, call = rpc.with_call(request, metadata=metadata,
                                               timeout=timeout or self.call_timeout_s)
                trailing = dict(call.trailing_metadata() or ())
                self.search_state = trailing.get(wire.SEARCH, self.search_state)
                if tries > 1 or not self.answered:
                    log.info("%s: connected to the chief at %s", self.worker_id, self.address)
                self.answered = True
                return response, trailing
            except grpc.RpcError as e:
                trailing = dict(e.trailing_metadata() or ())
                self._raise_known(e, trailing)
                if e.code() not in _RETRY_CODES:
                    raise
                outcome = self._outcome() if self._outcome else None
                if outcome is not None:
                    self._raise_outcome(outcome)
                now = time.monotonic()
                if patient and self.stop_requested is not None and self.stop_requested():
                    from skin.tuning.preempt import Preempted

                    raise Preempted(f"SIGTERM while the chief does not answer {method}") from None
                if not patient:
                    raise RetryableError(f"the chief at {self.address} did not answer "
                                         f"{method} ({e.code().name})") from None
                if now >= deadline:
                    raise RetryableError(
                        f"the chief at {self.address} did not answer for "
                        f"{self.patience_s:.0f} s ({e.code().name}: {e.details()})") from None
                if tries == 1 or now - last_note > 30:
                    if self.answered:
                        log.warning("%s: the chief at %s does not answer %s (%s); retrying "
                                    "with backoff for up to %.0f s", self.worker_id,
                                    self.address, method, e.code().name, deadline - now)
                    else:
                        log.info("%s: waiting for the chief at %s (up to %.0f s)",
                                 self.worker_id, self.address, deadline - now)
                    last_note = now
                time.sleep(min(delay * (1 + 0.25 * random.random()), max(0.0, deadline - now)))
                delay = min(delay * 2, self.max_backoff_s)

    def _raise_known(self, e: grpc.RpcError, trailing: dict) -> None:
        state = trailing.get(wire.SEARCH)
        if state:
            self.search_state = state
        if trailing.get(wire.LEASE) == wire.LEASE_LOST:
            raise LeaseLostError(e.details()) from None
        if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise ConfigError(f"the chief at {self.address} refused {self.worker_id} "
                              f"({e.code().name}: {e.details()}); check SKIN_ORACLE_TOKEN(_FILE) "
                              "and the worker id against the chief's") from None
        if state in ("failed", "finished") and e.code() == grpc.StatusCode.FAILED_PRECONDITION:
            self._raise_outcome({"outcome": "failed" if state == "failed" else "completed",
                                 "reason": trailing.get(wire.REASON, e.details())})

    @staticmethod
    def _raise_outcome(outcome: dict) -> None:
        if outcome.get("outcome") == "failed":
            raise SearchFailedError(f"the search failed: {outcome.get('reason') or 'no reason'}")
        raise SearchOver(outcome.get("reason") or "the search finished")

    # -- keras-tuner's oracle interface ----------------------------------------------------

    def get_space(self):
        from keras_tuner.src.engine import hyperparameters as hp_module

        response, _ = self._call("GetSpace", self._service.GetSpaceRequest(), self._metadata())
        return hp_module.HyperParameters.from_proto(response.hyperparameters)

    def update_space(self, hyperparameters):
        self._call("UpdateSpace", self._service.UpdateSpaceRequest(
            hyperparameters=hyperparameters.to_proto()), self._metadata())

    def create_trial(self, tuner_id: str):
        """The next trial: RUNNING, IDLE (nothing yet; ask again later) or STOPPED (done)."""
        from keras_tuner.src.engine import trial as trial_module

        response, trailing = self._call("CreateTrial", self._service.CreateTrialRequest(
            tuner_id=tuner_id), self._metadata())
        trial = trial_module.Trial.from_proto(response.trial)
        if trial.status == "RUNNING" and trailing.get(wire.ATTEMPT):
            self.attempts[trial.trial_id] = int(trailing[wire.ATTEMPT])
        if trial.status == "STOPPED":
            state = trailing.get(wire.SEARCH, "finished")
            self._raise_outcome({"outcome": "failed" if state == "failed" else "completed",
                                 "reason": trailing.get(wire.REASON, "")})
        return trial

    def report_epoch(self, trial_id: str, epoch: int, logs: dict) -> str:
        """Progress of a running trial; renews its lease. One try: training goes on regardless.
        Returns the trial's status in the reply: ``STOPPED`` when the chief stops it early."""
        request = self._service.UpdateTrialRequest(trial_id=trial_id, metrics=logs, step=epoch)
        response, _ = self._call("UpdateTrial", request,
                                 self._metadata(trial_id, **{wire.REPORT: wire.REPORT_EPOCH}),
                                 patient=False)
        from keras_tuner.src.engine import trial as trial_module

        return trial_module.Trial.from_proto(response.trial).status

    def heartbeat(self, trial_id: str) -> None:
        """Still training ``trial_id`` (mid-epoch): renews its lease. One try, like a report."""
        request = self._service.UpdateTrialRequest(trial_id=trial_id, metrics={}, step=0)
        self._call("UpdateTrial", request,
                   self._metadata(trial_id, **{wire.REPORT: wire.REPORT_HEARTBEAT}),
                   patient=False)

    def release(self, trial_id: str, epochs: int, timeout_s: float = 5.0,
                first_epoch: int | None = None) -> None:
        """Hand ``trial_id`` back (preempted) with ``epochs`` finished and in the bucket.

        One short try: the pod has seconds left. If the chief does not answer, the trial
        stays leased to this worker id: a replacement with the same id gets it back, or
        the lease runs out and the chief reclaims it.
        """
        request = self._service.UpdateTrialRequest(trial_id=trial_id, metrics={},
                                                   step=int(epochs))
        try:
            extra = {wire.REPORT: wire.REPORT_RELEASE}
            if first_epoch is not None:
                extra[wire.EPOCHS] = f"{int(first_epoch)}:{int(epochs)}"
            self._call("UpdateTrial", request, self._metadata(trial_id, **extra),
                       patient=False, timeout=timeout_s)
        finally:
            self.attempts.pop(trial_id, None)

    def update_trial(self, trial_id: str, metrics: dict, step: int = 0):
        from keras_tuner.src.engine import trial as trial_module

        response, _ = self._call("UpdateTrial", self._service.UpdateTrialRequest(
            trial_id=trial_id, metrics=metrics, step=step), self._metadata(trial_id))
        return trial_module.Trial.from_proto(response.trial)

    def end_trial(self, trial, *, watchdog: bool = False, timeout_s: float | None = None,
                  epochs: tuple[int, int] | None = None) -> None:
        """End the trial at the chief; ``watchdog``: a hung worker's last call (one short try);
        ``epochs``: (epoch resumed at, epochs finished) by this worker."""
        try:
            extra = {wire.MESSAGE: wire.ascii_value(_tail(trial.message), 2000)} \
                if trial.message else {}
            if epochs is not None:
                extra[wire.EPOCHS] = f"{int(epochs[0])}:{int(epochs[1])}"
            if watchdog:
                extra[wire.REPORT] = wire.REPORT_WATCHDOG
            self._call("EndTrial", self._service.EndTrialRequest(trial=trial.to_proto()),
                       self._metadata(trial.trial_id, **extra), patient=not watchdog,
                       timeout=timeout_s)
        finally:
            self.attempts.pop(trial.trial_id, None)

    def get_trial(self, trial_id: str):
        from keras_tuner.src.engine import trial as trial_module

        response, _ = self._call("GetTrial", self._service.GetTrialRequest(trial_id=trial_id),
                                 self._metadata())
        return trial_module.Trial.from_proto(response.trial)

    def get_best_trials(self, num_trials: int = 1):
        from keras_tuner.src.engine import trial as trial_module

        response, _ = self._call("GetBestTrials", self._service.GetBestTrialsRequest(
            num_trials=num_trials), self._metadata())
        return [trial_module.Trial.from_proto(t) for t in response.trials]


def _tail(message: str) -> str:
    """A traceback in one line: the error, then where it was raised."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    where = next((ln for ln in reversed(lines) if ln.startswith("File ")), "")
    return f"{lines[-1]} ({where})" if where else lines[-1]
