"""``skin status``: where a running search is, read from the chief's metrics endpoint.

The chief's ``/metrics`` (an address, or its Service through ``kubectl
port-forward``) carries everything the table shows: trials by status, the
best score and when it last improved, each worker's last report and trial
epoch, and the time left. No bucket access is needed.

The best trial is named by ``skin_chief_best_trial_number``, keras-tuner's
numeric trial id as a gauge *value* (a trial id is never a label). Its
hyperparameters are not metrics: given an experiment and a storage, the
status also reads ``<root>/tuner/best_hyperparameters.json`` from the bucket.

When the chief cannot be reached, the status says how to reach it on Kubernetes
(``kubectl port-forward`` of the chief's Service, ``skin-chief-<experiment>`` as the
overlays name it) and, given a
bucket (``--bucket``, or the experiment of ``--config``), falls back to what the bucket
says (:mod:`skin.experiments`): staged, searching, retraining, published or failed.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from skin.errors import EXIT_OK, EXIT_RETRYABLE, DocumentError
from skin.experiments import experiment_state, format_state, list_experiments
from skin.infra import documents
from skin.infra.storage import Storage
from skin.metrics import TRIAL_STATUSES

log = logging.getLogger(__name__)

# The chief's metrics on Kubernetes: k8s/namespace.yaml and k8s/base/network/chief-service.yaml,
# whose name an overlay suffixes with its experiment's (nameSuffix: skin-chief-skin-cnn).
# tests/test_status.py checks these against the manifests.
K8S_NAMESPACE = "skin"
CHIEF_SERVICE = "skin-chief"
CHIEF_METRICS_PORT = 9090


def chief_service(experiment: str | None) -> str:
    """The chief's Service of an experiment (``EXPERIMENT`` as a placeholder when unknown)."""
    return f"{CHIEF_SERVICE}-{experiment or 'EXPERIMENT'}"


def port_forward_hint(address: str, experiment: str | None = None) -> str:
    """How to reach the chief's metrics from a laptop when it runs on Kubernetes; names the
    experiment's Service when the experiment is known."""
    local = address.rsplit(":", 1)[-1].split("/", 1)[0] if ":" in address.split("//")[-1] \
        else str(CHIEF_METRICS_PORT)
    if not local.isdigit():
        local = str(CHIEF_METRICS_PORT)
    return (f"  On Kubernetes, forward the chief's metrics port first, then run skin status "
            f"again:\n"
            f"    kubectl -n {K8S_NAMESPACE} port-forward svc/{chief_service(experiment)} "
            f"{local}:{CHIEF_METRICS_PORT}\n"
            + ("" if experiment else
               f"  (the experiments' chiefs: kubectl -n {K8S_NAMESPACE} get svc "
               f"-l app.kubernetes.io/component=chief)\n")
            + "  (another namespace: -n NAMESPACE; another local port: --address "
            "127.0.0.1:PORT). Without the chief, --bucket gs://BUCKET/PREFIX/NAME shows what "
            "the bucket says.")


@dataclass
class WorkerStatus:
    worker: str
    last_report_age: float | None = None  # seconds; None: never reported
    running: bool = False
    epoch: int | None = None
    epochs_budget: int | None = None


@dataclass
class Status:
    address: str
    fetched_at: float
    trials: dict[str, int] = field(default_factory=dict)  # every TRIAL_STATUSES key
    started: int = 0
    best: float | None = None
    best_trial: str | None = None
    best_improved_age: float | None = None  # seconds since the best improved
    objective: str = ""
    direction: str = ""
    experiment: str = ""
    tuner: str = ""
    workers: list[WorkerStatus] = field(default_factory=list)
    workers_connected: int = 0
    workers_expected: int = 0
    done: int = 0
    total_estimate: int | None = None
    time_left: float | None = None  # seconds
    finished: bool = False
    version: str = ""
    best_hyperparameters: documents.BestTrial | None = None  # from the bucket, when asked for


def _url(address: str) -> str:
    if "://" not in address:
        address = "http://" + address
    return address if address.rstrip("/").endswith("/metrics") else address.rstrip("/") + "/metrics"


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def parse(text: str, address: str = "", now: float | None = None) -> Status:
    """A :class:`Status` from the chief's metrics in the Prometheus text format."""
    now = time.time() if now is None else now
    st = Status(address=address, fetched_at=now, trials={s: 0 for s in TRIAL_STATUSES})
    workers: dict[str, WorkerStatus] = {}

    def worker(name: str) -> WorkerStatus:
        return workers.setdefault(name, WorkerStatus(name))

    scalars: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "skin_chief_trials_ended_total":
                st.trials[labels.get("status", "")] = int(value)
            elif name == "skin_chief_search_info":
                st.objective = labels.get("objective", "")
                st.direction = labels.get("direction", "")
                st.experiment = labels.get("experiment", "")
                st.tuner = labels.get("tuner", "")
            elif name == "skin_build_info":
                st.version = labels.get("version", "")
            elif name == "skin_chief_worker_last_report_timestamp_seconds":
                worker(labels["worker"]).last_report_age = max(0.0, now - value)
            elif name == "skin_chief_worker_reports_total":
                worker(labels["worker"])
            elif name == "skin_chief_worker_trials_running":
                worker(labels["worker"]).running = value > 0
            elif name == "skin_chief_worker_trial_epoch":
                worker(labels["worker"]).epoch = int(value)
            elif name == "skin_chief_worker_trial_epochs_budget":
                worker(labels["worker"]).epochs_budget = int(value)
            elif not labels:
                scalars[name] = value
    if "skin_chief_trials_running" not in scalars:
        raise ValueError(f"{address or 'the endpoint'} does not serve a skin chief's metrics "
                         "(no skin_chief_trials_running)")
    st.trials["running"] = int(scalars["skin_chief_trials_running"])
    st.started = int(scalars.get("skin_chief_trials_started_total", 0))
    st.best = _number(scalars.get("skin_chief_best_objective"))
    number = _number(scalars.get("skin_chief_best_trial_number"))
    st.best_trial = None if number is None else str(int(number))
    improved = scalars.get("skin_chief_best_objective_improved_timestamp_seconds", 0.0)
    st.best_improved_age = max(0.0, now - improved) if improved > 0 else None
    st.workers_connected = int(scalars.get("skin_chief_workers_connected", 0))
    st.workers_expected = int(scalars.get("skin_chief_workers_expected", 0))
    st.done = int(scalars.get("skin_chief_search_trials_done", 0))
    total = _number(scalars.get("skin_chief_search_trials_estimated"))
    st.total_estimate = None if total is None else int(total)
    st.finished = scalars.get("skin_chief_search_finished", 0.0) >= 1
    end = _number(scalars.get("skin_chief_search_estimated_end_timestamp_seconds"))
    st.time_left = 0.0 if st.finished else (None if end is None else max(0.0, end - now))
    st.workers = sorted(workers.values(), key=_worker_order)
    return st


def _worker_order(w: WorkerStatus):
    digits = w.worker.removeprefix("tuner")
    return (0, int(digits), "") if digits.isdigit() else (1, 0, w.worker)


def fetch(address: str, timeout: float = 5.0) -> Status:
    """Read and parse the chief's ``/metrics`` at ``address`` (``host:port`` or a URL).
    Raises ``OSError`` when it cannot be reached and ``ValueError`` when it is not a chief."""
    with urllib.request.urlopen(_url(address), timeout=timeout) as response:
        text = response.read().decode("utf-8")
    return parse(text, address)


def read_best_hyperparameters(exp, storage) -> documents.BestTrial | None:
    """``<root>/tuner/best_hyperparameters.json`` of an experiment, or None before it exists
    (or, with a warning, when it is not one this version reads)."""
    try:
        return documents.read_best(storage, exp)
    except FileNotFoundError:
        return None
    except DocumentError as e:
        log.warning("best hyperparameters not shown: %s", e)
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{m:02d}m"
    days, h = divmod(hours, 24)
    return f"{days}d{h:02d}h"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_status(status: Status) -> str:
    """A compact, fixed-width table of :class:`Status`."""
    st = status
    title = f"search {st.experiment or '?'}"
    if st.tuner:
        title += f" ({st.tuner}"
        title += f", {st.direction}imise {st.objective})" if st.objective else ")"
    state = "finished" if st.finished else "running"
    lines = [f"{title} at {st.address}: {state}"]
    counts = "  ".join(f"{s} {st.trials.get(s, 0)}" for s in TRIAL_STATUSES)
    lines.append(f"trials     {counts}")
    progress = f"{st.done}" + (f" of ~{st.total_estimate}" if st.total_estimate else "")
    lines.append(f"progress   {progress} trials done; time left {_duration(st.time_left)}")
    best = f"best       {st.objective or 'objective'} {_score(st.best)}"
    if st.best is not None:
        if st.best_trial is not None:
            best += f" (trial {st.best_trial})"
        best += f", improved {_duration(st.best_improved_age)} ago"
    lines.append(best)
    if st.best_hyperparameters is not None:
        hp = st.best_hyperparameters.hyperparameters
        lines.append("           " + ", ".join(f"{k}={v}" for k, v in sorted(hp.items())))
    lines.append(f"workers    {st.workers_connected} connected of {st.workers_expected or '?'}")
    if st.workers:
        lines.append(f"  {'worker':<10} {'trial':<8} {'epoch':>9} {'last report':>12}")
        for w in st.workers:
            epoch = "-"
            if w.epoch is not None and w.running:
                epoch = f"{w.epoch}/{w.epochs_budget}" if w.epochs_budget else str(w.epoch)
            age = "never" if w.last_report_age is None else _duration(w.last_report_age) + " ago"
            lines.append(f"  {w.worker:<10} {'running' if w.running else 'idle':<8} "
                         f"{epoch:>9} {age:>12}")
    return "\n".join(lines)


def main_status(address: str, watch: bool = False, interval: float = 5.0, *,
                experiment=None, storage=None, out: TextIO | None = None,
                refreshes: int | None = None, bucket: str | None = None,
                sleep: Callable[[float], None] = time.sleep) -> int:
    """``skin status``: print the table once (or every ``interval`` seconds with ``watch``,
    until Ctrl-C or ``refreshes`` tables). With ``experiment`` and ``storage`` it adds the
    best trial's hyperparameters from the bucket.

    When the chief cannot be read: how to reach it (``kubectl port-forward``), and, with
    ``bucket`` (an experiment root, or a bucket or prefix holding several) or
    ``experiment``, what the bucket says instead. Exit 0; 75 (retryable) when the chief
    cannot be read and there is no bucket to fall back to (or it holds no experiment)."""
    out = out or sys.stdout
    clear = watch and out.isatty()
    shown = 0
    try:
        while True:
            fallback = ""
            try:
                status = fetch(address)
                if experiment is not None and storage is not None:
                    status.best_hyperparameters = read_best_hyperparameters(experiment, storage)
                text = format_status(status)
                ok = True
            except (OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                text = (f"skin status: cannot read the chief's metrics at {_url(address)}: "
                        f"{reason}\n"
                        f"{port_forward_hint(address, getattr(experiment, 'name', None))}")
                ok = False
                fallback = _from_bucket(bucket, experiment, storage)
            if clear:
                out.write("\033[H\033[J")
            if watch:
                text += f"\n(refreshing every {interval:g}s; Ctrl-C to stop)"
            print(text, file=out if ok or watch else sys.stderr, flush=True)
            if fallback:
                print(fallback, file=out, flush=True)
            shown += 1
            if not watch:
                return EXIT_OK if ok or fallback else EXIT_RETRYABLE
            if refreshes is not None and shown >= refreshes:
                return EXIT_OK
            sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _from_bucket(bucket: str | None, experiment, storage) -> str:
    """What the bucket says about the experiment(s), as text; '' when there is nothing."""
    if bucket is None and experiment is None:
        return ""
    if storage is None:
        storage = Storage()
    base = bucket or experiment.root_uri
    try:
        states = list_experiments(storage, base)
        if experiment is not None:
            states = [s for s in states if s["root"] == experiment.root_uri] or \
                [experiment_state(storage, experiment.root_uri)]
    except (OSError, ValueError) as e:
        return f"skin status: cannot read {base} either: {e}"
    states = [s for s in states if s["state"] != "empty"]
    if not states:
        return ""
    return "\n".join([f"From the bucket ({base}):"] + [format_state(s) for s in states])
