"""The chief's gRPC side: keras-tuner's ``OracleService`` over our leased oracle.

:func:`make_servicer` subclasses keras-tuner's ``OracleServicer``: every call is
checked for its caller first (``auth.py``: worker id, attempt), takes the oracle's
lock, and answers once the change it made is in the bucket (it waits for its
journal batch). The oracle's errors become status codes with trailing metadata
(``protocol.py``). :func:`serve` runs it from a thread pool (stock keras-tuner
serves one call at a time), with the experiment's token and TLS when configured.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent import futures

import grpc

from skin.errors import RetryableError
from skin.tuning import auth
from skin.tuning import protocol as wire
from skin.tuning.hooks import ChiefHooks

log = logging.getLogger("skin.tuning")

RPC_THREADS = 32


def _rpc(method):
    """Time a servicer method and turn our exceptions into gRPC status codes."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            return method(self, request, context)
        except auth.Refusal as e:  # logged once per caller by auth.CallerCheck
            self.metrics.oracle_refused(e.reason)
            context.abort(e.code, wire.ascii_value(e))
        except wire.Refused as e:
            self.metrics.oracle_refused(e.reason)
            log.warning("%s refused: %s", name, e)
            context.abort(grpc.StatusCode.PERMISSION_DENIED if e.denied else
                          grpc.StatusCode.INVALID_ARGUMENT, wire.ascii_value(e))
        except wire.LeaseLost as e:
            self.metrics.oracle_refused("not_holder")
            context.set_trailing_metadata(((wire.LEASE, wire.LEASE_LOST),
                                           (wire.SEARCH, self.oracle.state)))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, wire.ascii_value(e))
        except wire.SearchStopped as e:
            context.set_trailing_metadata(((wire.SEARCH, e.state),
                                           (wire.REASON, wire.ascii_value(e.reason))))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, wire.ascii_value(e.reason))
        except RetryableError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, wire.ascii_value(e))
        except (ValueError, KeyError) as e:
            log.warning("%s rejected: %s", name, e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, wire.ascii_value(e))
        finally:
            self.metrics.oracle_call(name, time.perf_counter() - t0)

    return wrapper


def _servicer_base():
    from keras_tuner.src.distribute import oracle_chief

    return oracle_chief.OracleServicer


def make_servicer(oracle, metrics: ChiefHooks | None = None, wait_timeout_s: float = 60.0,
                  workers: int | None = None):
    """keras-tuner's OracleServicer, subclassed: locking, leases, durable answers, callers
    checked (``workers``: the experiment's worker count; None accepts any ``tuner<N>``)."""
    from keras_tuner.src import protos
    from keras_tuner.src.engine import hyperparameters as hp_module
    from keras_tuner.src.engine import trial as trial_module

    service = protos.get_service()
    callers = auth.CallerCheck(workers)

    class OracleServicer(_servicer_base()):
        def __init__(self):
            super().__init__(oracle)
            self.metrics = metrics if metrics is not None else ChiefHooks()

        def _wait(self, ticket: int) -> None:
            if ticket >= 0 and oracle.journal is not None:
                oracle.journal.wait(ticket, wait_timeout_s)

        @staticmethod
        def _caller(context, method: str, **kw) -> tuple[str, int | None, dict]:
            return callers.caller(context, method, **kw)

        @_rpc
        def GetSpace(self, request, context):
            self._caller(context, "GetSpace")
            with oracle.lock:
                return service.GetSpaceResponse(hyperparameters=oracle.get_space().to_proto())

        @_rpc
        def UpdateSpace(self, request, context):
            self._caller(context, "UpdateSpace")
            hps = hp_module.HyperParameters.from_proto(request.hyperparameters)
            oracle.confirm_space(hps)  # never merged: the space is the chief's
            return service.UpdateSpaceResponse()

        @_rpc
        def CreateTrial(self, request, context):
            self._caller(context, "CreateTrial", tuner_id=request.tuner_id)
            assignment = oracle.assign(request.tuner_id)
            self._wait(assignment.ticket)
            md = [(wire.SEARCH, oracle.state)]
            if assignment.attempt:
                md.append((wire.ATTEMPT, str(assignment.attempt)))
            if oracle.state != "running":
                md.append((wire.REASON, wire.ascii_value(oracle.reason)))
            context.set_trailing_metadata(tuple(md))
            with oracle.lock:
                proto = assignment.trial.to_proto()
            return service.CreateTrialResponse(trial=proto)

        @_rpc
        def UpdateTrial(self, request, context):
            worker, attempt, md = self._caller(context, "UpdateTrial", attempt_required=True)
            if md.get(wire.REPORT) == wire.REPORT_RELEASE:
                span = wire.parse_epochs(md.get(wire.EPOCHS))
                self._wait(oracle.release(request.trial_id, worker, attempt, int(request.step),
                                          first_epoch=span[0] if span else None))
                context.set_trailing_metadata(((wire.SEARCH, oracle.state),))
                return service.UpdateTrialResponse()
            if md.get(wire.REPORT) == wire.REPORT_HEARTBEAT:
                trial = oracle.heartbeat(request.trial_id, worker, attempt)
            else:
                trial = oracle.report(request.trial_id, worker, attempt, dict(request.metrics),
                                      int(request.step),
                                      progress_only=md.get(wire.REPORT) == wire.REPORT_EPOCH)
            with oracle.lock:
                proto = trial.to_proto()
            context.set_trailing_metadata(((wire.SEARCH, oracle.state),))
            return service.UpdateTrialResponse(trial=proto)

        @_rpc
        def EndTrial(self, request, context):
            worker, attempt, md = self._caller(context, "EndTrial", attempt_required=True)
            trial = trial_module.Trial.from_proto(request.trial)
            trial.message = md.get(wire.MESSAGE)  # not part of keras-tuner's Trial message
            if md.get(wire.REPORT) == wire.REPORT_WATCHDOG:
                log.error("%s's watchdog ends trial %s: %s; the worker exits and is replaced",
                          worker, trial.trial_id, trial.message)
                self.metrics.worker_watchdog_exit(worker or "?")
            self._wait(oracle.end(trial, worker, attempt, wire.parse_epochs(md.get(wire.EPOCHS))))
            md = [(wire.SEARCH, oracle.state)]
            if oracle.state != "running":
                md.append((wire.REASON, wire.ascii_value(oracle.reason)))
            context.set_trailing_metadata(tuple(md))
            return service.EndTrialResponse()

        @_rpc
        def GetTrial(self, request, context):
            self._caller(context, "GetTrial")
            with oracle.lock:
                trial = oracle.trials.get(request.trial_id)
                if trial is None:
                    raise KeyError(f"trial {request.trial_id} is unknown")
                return service.GetTrialResponse(trial=trial.to_proto())

        @_rpc
        def GetBestTrials(self, request, context):
            self._caller(context, "GetBestTrials")
            with oracle.lock:
                trials = oracle.get_best_trials(request.num_trials)
                return service.GetBestTrialsResponse(trials=[t.to_proto() for t in trials])

    return OracleServicer()


def serve(servicer, port: int, host: str = "127.0.0.1", threads: int = RPC_THREADS, *,
          token: str = "", tls_dir: str = "", metrics: ChiefHooks | None = None) -> grpc.Server:
    """Start a gRPC server for ``servicer`` on ``host`` (comma-separated addresses): with
    ``token``, calls without it are refused; with ``tls_dir``, TLS. RetryableError when a
    port cannot be bound."""
    from keras_tuner.src import protos

    interceptors = []
    if token:
        hooks = metrics if metrics is not None else ChiefHooks()
        interceptors.append(auth.TokenInterceptor(token, on_refused=hooks.oracle_refused))
    credentials = auth.server_credentials(tls_dir) if tls_dir else None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads,
                                                    thread_name_prefix="oracle-rpc"),
                         interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    for h in (h.strip() for h in host.split(",") if h.strip()):
        address = f"[{h}]:{port}" if ":" in h and not h.startswith("[") else f"{h}:{port}"
        try:
            bound = server.add_secure_port(address, credentials) if credentials else \
                server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            server.stop(0)
            raise RetryableError(f"the oracle cannot listen on {address} (port in use, or not "
                                 "an address of this host?)")
    server.start()
    return server
