"""Who may call the oracle: the experiment's token, optional TLS, and this experiment's worker ids.

- **Token.** Every call carries ``authorization: Bearer <token>`` (gRPC call
  metadata). :class:`TokenInterceptor` checks it on the chief before any
  servicer code runs, in constant time (``hmac.compare_digest``), and answers
  ``UNAUTHENTICATED`` otherwise. The token is per experiment: a Kubernetes
  Secret mounted by the chief and the workers (``SKIN_ORACLE_TOKEN_FILE``), or a
  fresh random one that ``skin run`` hands its children in the environment
  (``SKIN_ORACLE_TOKEN``). It is never logged.
- **TLS** (optional, off by default). ``SKIN_ORACLE_TLS_DIR`` names a folder
  laid out like a ``kubernetes.io/tls`` Secret plus its CA: the chief serves with
  ``tls.crt``/``tls.key``, workers verify the chief against ``ca.crt``.
- **Identity.** :class:`CallerCheck` requires the caller's worker id
  (``skin-worker``) on every call, and the attempt (``skin-attempt``) on every
  report and ending; the id must be one this experiment can have (``chief``,
  ``tuner0`` ... ``tuner<workers-1>``). Anything else is ``PERMISSION_DENIED``,
  logged once per caller. Whether the caller holds the trial is the oracle's
  check (``LeasedOracle._check_owner``).

Every refusal is counted by reason (``skin_oracle_refused_calls_total``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from skin.errors import ConfigError
from skin.tuning import protocol as wire

log = logging.getLogger("skin.tuning")

AUTHORIZATION = "authorization"
SCHEME = "Bearer "
TLS_CERT, TLS_KEY, TLS_CA = "tls.crt", "tls.key", "ca.crt"
_LOGGED_CALLERS_MAX = 1000
_WORKER_RE = re.compile(r"^(chief|tuner(0|[1-9][0-9]{0,5}))$")


class Refusal(Exception):
    """A call the chief refuses before it touches any state."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason = code, reason


def bearer(token: str) -> tuple[str, str]:
    """The call metadata that authenticates a worker."""
    return AUTHORIZATION, SCHEME + token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _peer_host(context) -> str:
    """``ipv4:10.1.2.3:5555`` -> ``ipv4:10.1.2.3`` (one caller, whatever its source port)."""
    peer = context.peer() or "?"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class _Once:
    """Log a refusal once per caller (bounded: a flood of callers cannot grow memory)."""

    def __init__(self):
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._full = False

    def log(self, key: tuple[str, str], message: str, *args) -> None:
        with self._lock:
            if key in self._seen:
                return
            if len(self._seen) >= _LOGGED_CALLERS_MAX:
                if not self._full:
                    self._full = True
                    log.warning("refused calls from more than %d callers; no longer logging "
                                "new ones (skin_oracle_refused_calls_total counts them all)",
                                _LOGGED_CALLERS_MAX)
                return
            self._seen.add(key)
        log.warning(message, *args)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses, with ``UNAUTHENTICATED``, every call that lacks the experiment's token."""

    def __init__(self, token: str, on_refused: Callable[[str], None] | None = None):
        if not token:
            raise ValueError("TokenInterceptor needs a token")
        self._expected = (SCHEME + token).encode()
        self._on_refused = on_refused
        self._once = _Once()

    def _authentic(self, metadata) -> tuple[bool, str]:
        given = [v for k, v in (metadata or ()) if k == AUTHORIZATION]
        if not given:
            return False, "no token"
        if len(given) > 1:
            return False, "more than one authorization value"
        value = given[0].encode() if isinstance(given[0], str) else given[0]
        # compare_digest takes as long for any wrong value of a given length.
        return hmac.compare_digest(value, self._expected), "wrong token"

    def intercept_service(self, continuation, handler_call_details):
        ok, why = self._authentic(handler_call_details.invocation_metadata)
        if ok:
            return continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def refuse(request, context):
            if self._on_refused is not None:
                self._on_refused("unauthenticated")
            peer = _peer_host(context)
            self._once.log((peer, "unauthenticated"), "refused %s from %s: %s (UNAUTHENTICATED; "
                           "further calls from it are counted, not logged)", method, peer, why)
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{why}: the oracle needs this experiment's token "
                          "(authorization: Bearer ...)")

        return grpc.unary_unary_rpc_method_handler(refuse)


class CallerCheck:
    """The worker id and attempt a call names, checked against this experiment's workers."""

    def __init__(self, workers: int | None):
        # None: any well-formed id (a chief serving tests without an experiment size)
        self.allowed = None if workers is None else \
            {"chief"} | {f"tuner{i}" for i in range(workers)}
        self._once = _Once()

    def _deny(self, context, method: str, worker: str | None, message: str) -> Refusal:
        peer = _peer_host(context)
        self._once.log((peer, str(worker)), "refused %s from %s as %r: %s (PERMISSION_DENIED; "
                       "further calls from this caller are counted, not logged)", method, peer,
                       wire.ascii_value(worker or "", 64) if worker else None, message)
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, "identity", message)

    def caller(self, context, method: str, *, attempt_required: bool = False,
               tuner_id: str | None = None) -> tuple[str, int | None, dict]:
        """(worker, attempt, metadata) of a call; :class:`Refusal` when they are not valid."""
        md = dict(context.invocation_metadata() or ())
        worker = md.get(wire.WORKER)
        if not worker:
            raise self._deny(context, method, None, f"no {wire.WORKER} metadata: every call "
                             "names its worker")
        known = _WORKER_RE.match(worker) and (self.allowed is None or worker in self.allowed)
        if not known:
            expected = "chief or tuner<N>" if self.allowed is None else \
                f"chief or tuner0..tuner{len(self.allowed) - 2}"
            raise self._deny(context, method, worker, f"worker {wire.ascii_value(worker, 64)!r} "
                             f"is not one of this experiment's ({expected})")
        if tuner_id is not None and tuner_id != worker:
            raise self._deny(context, method, worker, f"tuner_id {wire.ascii_value(tuner_id, 64)!r}"
                             f" is not the caller's ({worker})")
        raw = md.get(wire.ATTEMPT)
        attempt = None
        if raw is not None:
            attempt = int(raw) if raw.isdigit() and 0 < len(raw) < 10 else 0
            if attempt < 1:
                raise self._deny(context, method, worker, f"{wire.ATTEMPT} "
                                 f"{wire.ascii_value(raw, 32)!r} is not a positive integer")
        elif attempt_required:
            raise self._deny(context, method, worker, f"no {wire.ATTEMPT} metadata: a report or "
                             "an ending names the attempt it belongs to")
        return worker, attempt, md


# -- TLS -------------------------------------------------------------------------------


def _read(tls_dir: str, name: str) -> bytes:
    path = Path(tls_dir) / name
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"SKIN_ORACLE_TLS_DIR: {path} cannot be read ({e.strerror or e}); "
                          f"expected {TLS_CERT} and {TLS_KEY} (chief) and {TLS_CA} (workers)") \
            from None


def server_credentials(tls_dir: str) -> grpc.ServerCredentials:
    """The chief's TLS credentials: its certificate chain and key from ``tls_dir``."""
    return grpc.ssl_server_credentials([(_read(tls_dir, TLS_KEY), _read(tls_dir, TLS_CERT))])


def channel_credentials(tls_dir: str) -> grpc.ChannelCredentials:
    """A worker's TLS credentials: the CA that signed the chief's certificate."""
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_dir, TLS_CA))


# -- the chief's policy -----------------------------------------------------------------


def check_chief_settings(runtime, hosts: tuple[str, ...]) -> None:
    """Refuse to serve an open oracle: ConfigError (exit 2) without a token where others can
    reach it (in Kubernetes, or any non-loopback address); a warning on loopback."""
    if runtime.oracle_token:
        return
    exposed = [h for h in hosts if not is_loopback(h)]
    if runtime.in_kubernetes or exposed:
        where = "in Kubernetes" if runtime.in_kubernetes else f"on {', '.join(exposed)}"
        raise ConfigError(
            f"SKIN_ORACLE_TOKEN_FILE / SKIN_ORACLE_TOKEN: not set; the chief will not serve an "
            f"oracle {where} that anyone who can reach it could steer. Create the token Secret "
            "(kubectl -n skin create secret generic skin-oracle-token "
            "--from-literal=token=\"$(openssl rand -base64 32)\"; docs/kubernetes.md) or, by "
            "hand, set SKIN_ORACLE_TOKEN for the chief and its workers")
    log.warning("the oracle does not authenticate calls (no SKIN_ORACLE_TOKEN): anyone on this "
                "machine can steer the search; `skin run` sets a token for you")
