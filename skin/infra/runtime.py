"""Per-process settings that only the environment gives: :class:`Runtime`.

The role (``KERASTUNER_TUNER_ID``), the oracle's address, ports, the scratch directory,
the oracle token and the other ``SKIN_*`` process settings, parsed once by
:func:`runtime_from_env`. With :mod:`skin.infra.config` (the experiment file and its
``SKIN_*`` overrides) the only reader of ``SKIN_*`` and ``KERASTUNER_*`` variables; a bad
value is a :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from skin.errors import ConfigError

_TUNER_ID_RE = re.compile(r"^(chief|tuner(0|[1-9][0-9]*))$")


@dataclass(frozen=True)
class Runtime:
    tuner_id: str = ""  # KERASTUNER_TUNER_ID: 'chief' or 'tuner<N>' ('' outside tuning)
    oracle_ip: str = "127.0.0.1"  # KERASTUNER_ORACLE_IP: where workers dial the chief
    oracle_port: int | None = None  # KERASTUNER_ORACLE_PORT (None: the experiment's chief.oracle_port)
    work_dir: Path = Path("/tmp/skin")  # SKIN_WORK_DIR: local scratch (an emptyDir in Kubernetes)
    # SKIN_BIND_ADDRESS: where the oracle (and, unless SKIN_METRICS_HOST says otherwise, the
    # metrics endpoint) listens; comma-separated. Default: 127.0.0.1; in a pod $POD_IP and
    # 127.0.0.1 (kubectl port-forward dials the pod's loopback).
    bind_address: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"  # SKIN_METRICS_HOST (default: bind_address)
    # SKIN_ORACLE_TOKEN, or the file SKIN_ORACLE_TOKEN_FILE (a mounted Secret): every oracle
    # call carries it (skin.tuning.auth). Never shown: repr leaves it out.
    oracle_token: str = field(default="", repr=False)
    oracle_tls_dir: str = ""  # SKIN_ORACLE_TLS_DIR: tls.crt/tls.key (chief), ca.crt (workers)
    in_kubernetes: bool = False  # KUBERNETES_SERVICE_HOST is set
    metrics_port: int | None = None  # SKIN_METRICS_PORT (None: role default; 0: off)
    retrain_job: str = ""  # SKIN_RETRAIN_JOB: suspended Job the chief starts when the search ends
    namespace: str = ""  # SKIN_NAMESPACE or POD_NAMESPACE
    pushgateway: str = ""  # SKIN_PUSHGATEWAY: host:port for batch-job metrics
    data_wait_seconds: float = 1800.0  # SKIN_DATA_WAIT_SECONDS: worker's bounded wait for staged data
    log_level: str = "INFO"  # SKIN_LOG_LEVEL
    metrics_linger_seconds: float = 0.0  # SKIN_METRICS_LINGER_SECONDS: wait for a last scrape

    @property
    def role(self) -> str:
        """'chief', 'worker' or '' (not part of a distributed search)."""
        if not self.tuner_id:
            return ""
        return "chief" if self.tuner_id == "chief" else "worker"

    @property
    def worker_index(self) -> int | None:
        return int(self.tuner_id[5:]) if self.role == "worker" else None

    @property
    def bind_hosts(self) -> tuple[str, ...]:
        return _hosts(self.bind_address)

    @property
    def metrics_hosts(self) -> tuple[str, ...]:
        return _hosts(self.metrics_host)


def _hosts(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(h.strip() for h in value.split(",") if h.strip()))


MIN_TOKEN_CHARS = 16
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces (a metadata value)


def _oracle_token(env: Mapping[str, str]) -> str:
    """The oracle token from SKIN_ORACLE_TOKEN or SKIN_ORACLE_TOKEN_FILE; never echoed."""
    value, path = env.get("SKIN_ORACLE_TOKEN", ""), env.get("SKIN_ORACLE_TOKEN_FILE", "")
    name = "SKIN_ORACLE_TOKEN"
    if value and path:
        raise ConfigError("SKIN_ORACLE_TOKEN and SKIN_ORACLE_TOKEN_FILE: both set; expected one")
    if path:
        name = f"SKIN_ORACLE_TOKEN_FILE ({path})"
        try:
            value = Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"SKIN_ORACLE_TOKEN_FILE: {path} cannot be read ({e.strerror or e}); is the "
                "token Secret created and mounted? (docs/kubernetes.md, \"The oracle token\")") \
                from None
        if not value:
            raise ConfigError(f"{name}: the file is empty; expected the experiment's token")
    if value and (len(value) < MIN_TOKEN_CHARS or not _TOKEN_RE.match(value)):
        raise ConfigError(f"{name}: not valid ({len(value)} characters); expected at least "
                          f"{MIN_TOKEN_CHARS} printable ASCII characters without spaces")
    return value


def _bind_address(env: Mapping[str, str], in_kubernetes: bool) -> str:
    value = env.get("SKIN_BIND_ADDRESS", "").strip()
    if not value:
        pod_ip = env.get("POD_IP", "").strip()
        value = f"{pod_ip},127.0.0.1" if in_kubernetes and pod_ip else \
            "0.0.0.0" if in_kubernetes else "127.0.0.1"
    for host in _hosts(value):
        if not re.match(r"^[A-Za-z0-9.:\[\]-]+$", host):
            raise ConfigError(f"SKIN_BIND_ADDRESS: {host!r} is not valid; expected IP addresses "
                              "or host names, comma-separated")
    if not _hosts(value):
        raise ConfigError(f"SKIN_BIND_ADDRESS: {value!r} is not valid; expected an address")
    return value


def _env_int(env: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    raw = env.get(name, "")
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ConfigError(f"{name}: {raw!r} is not valid; expected an integer from {lo} to {hi}")
    return value


def _env_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{name}: {raw!r} is not valid; expected a number of seconds >= 0")
    return value


def runtime_from_env(env: Mapping[str, str] | None = None) -> Runtime:
    env = os.environ if env is None else env
    tuner_id = env.get("KERASTUNER_TUNER_ID", "")
    if tuner_id and not _TUNER_ID_RE.match(tuner_id):
        raise ConfigError(f"KERASTUNER_TUNER_ID: {tuner_id!r} is not valid; expected 'chief' or "
                          "'tuner<N>' (N a non-negative integer without leading zeros)")
    data_wait = _env_seconds(env, "SKIN_DATA_WAIT_SECONDS", Runtime.data_wait_seconds)
    linger = _env_seconds(env, "SKIN_METRICS_LINGER_SECONDS", Runtime.metrics_linger_seconds)
    level = env.get("SKIN_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"SKIN_LOG_LEVEL: {level!r} is not valid; expected one of DEBUG, INFO, "
                          "WARNING, ERROR")
    in_kubernetes = bool(env.get("KUBERNETES_SERVICE_HOST", ""))
    bind_address = _bind_address(env, in_kubernetes)
    return Runtime(
        tuner_id=tuner_id,
        oracle_ip=env.get("KERASTUNER_ORACLE_IP", "") or "127.0.0.1",
        oracle_port=_env_int(env, "KERASTUNER_ORACLE_PORT", 1, 65535),
        work_dir=Path(env.get("SKIN_WORK_DIR", "") or "/tmp/skin"),
        bind_address=bind_address,
        metrics_host=env.get("SKIN_METRICS_HOST", "") or bind_address,
        oracle_token=_oracle_token(env),
        oracle_tls_dir=env.get("SKIN_ORACLE_TLS_DIR", ""),
        in_kubernetes=in_kubernetes,
        metrics_port=_env_int(env, "SKIN_METRICS_PORT", 0, 65535),
        retrain_job=env.get("SKIN_RETRAIN_JOB", ""),
        namespace=env.get("SKIN_NAMESPACE", "") or env.get("POD_NAMESPACE", ""),
        pushgateway=env.get("SKIN_PUSHGATEWAY", ""),
        data_wait_seconds=data_wait,
        log_level=level,
        metrics_linger_seconds=linger,
    )
