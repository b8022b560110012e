"""A worker: sync the staged data once, then run the chief's trials until the search ends.

Exit codes (skin/errors.py): 0 when the chief says the search finished (or the
bucket says so after the chief left); 4 when the search failed; 75 when the
chief stays unreachable or the bucket is unavailable (the Job restarts the pod
with the same id, which gets its trial back); 3 for unusable data; 80 after a
SIGTERM, its trial handed back to the chief (preempt.py); 81 when its training
hung (watchdog.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from skin.data import dataset as skin_data
from skin.errors import (
    EXIT_OK,
    ConfigError,
    SearchFailedError,
    exits,
)
from skin.tuning.client import ChiefClient, SearchOver
from skin.tuning.hooks import WorkerHooks
from skin.tuning.preempt import Preemption
from skin.tuning.results import read_outcome
from skin.tuning.watchdog import Watchdog

log = logging.getLogger("skin.tuning")

# How long a worker waits for an unreachable chief before it exits 75: long enough for a
# chief pod to be rescheduled and reload its state, bounded so a vanished chief shows.
MIN_CHIEF_PATIENCE_S = 120.0


def chief_patience(exp) -> float:
    return max(MIN_CHIEF_PATIENCE_S, 2 * exp.search.lease_seconds)


def sync(storage, exp, runtime, metrics) -> tuple[Path, int]:
    """Copy the staged data to local disk once; (local dir, training images per epoch)."""
    skin_data.wait_for_manifest(storage, exp.data_uri, runtime.data_wait_seconds,
                                setting="SKIN_DATA_WAIT_SECONDS")
    local = Path(runtime.work_dir) / "data"
    t0 = time.monotonic()
    path = Path(skin_data.sync_data(
        storage, exp.data_uri, local,
        on_synced=metrics.data_synced))
    seconds = time.monotonic() - t0
    nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    try:
        images = int(skin_data.load_manifest(path)["splits"]["train"]["count"])
    except Exception:  # noqa: BLE001 - only feeds the images/s metric
        images = 0
    log.info("data ready in %s (%.1f MB in %.1f s)", path, nbytes / 1e6, seconds)
    return path, images


@exits(lambda ctx: ctx.runtime.tuner_id)
def run_worker(ctx) -> int:
    """Run trials for the chief until the search ends; the process exit code."""
    metrics = ctx.metrics if ctx.metrics is not None else WorkerHooks()
    preemption = Preemption(ctx.runtime.tuner_id)
    with preemption:
        return _run_worker(ctx.exp, ctx.runtime, ctx.storage, metrics, ctx.hypermodel,
                           preemption)


def _run_worker(exp, runtime, storage, metrics, make_hypermodel, preemption=None) -> int:
    from skin.tuning.oracle import make_oracle  # keras-tuner and TensorFlow: loaded here,
    from skin.tuning.tuner import WorkerTuner  # once the worker knows it has work to do

    worker = runtime.tuner_id
    if runtime.role != "worker":
        raise ConfigError(f"KERASTUNER_TUNER_ID: {worker!r} is not valid for a worker; expected "
                          "'tuner<N>'")
    if runtime.in_kubernetes and not runtime.oracle_token:
        raise ConfigError("SKIN_ORACLE_TOKEN_FILE / SKIN_ORACLE_TOKEN: not set; the chief refuses "
                          "workers without the experiment's token (docs/kubernetes.md, "
                          "\"The oracle token\")")
    outcome = read_outcome(storage, exp)
    if outcome is not None:
        if outcome["outcome"] == "failed":
            raise SearchFailedError(f"the search failed: {outcome['reason']}")
        log.info("%s: the search of %s already finished; nothing to do", worker, exp.name)
        return EXIT_OK
    hypermodel = make_hypermodel()
    fit_kwargs: dict = {}
    images = 0
    if getattr(hypermodel, "uses_data", True):
        data_dir, images = sync(storage, exp, runtime, metrics)
        fit_kwargs["data_dir"] = str(data_dir)

    port = runtime.oracle_port or exp.chief.oracle_port
    address = f"{runtime.oracle_ip}:{port}"
    local_oracle = make_oracle(exp, leased=False)
    client = ChiefClient(address, worker, local_oracle, patience_s=chief_patience(exp),
                         outcome=lambda: read_outcome(storage, exp),
                         token=runtime.oracle_token, tls_dir=runtime.oracle_tls_dir)
    directory = Path(runtime.work_dir) / "tuner" / worker
    directory.mkdir(parents=True, exist_ok=True)
    watchdog = Watchdog(worker, exp.search.watchdog_leases * exp.search.lease_seconds)
    tuner = WorkerTuner(local_oracle=local_oracle, client=client, hypermodel=hypermodel,
                        storage=storage, exp=exp, tuner_id=worker, directory=directory,
                        metrics=metrics, images_per_epoch=images, preemption=preemption,
                        watchdog=watchdog if watchdog.enabled else None)
    watchdog.on_fire = tuner.end_hung
    watchdog.start()
    if preemption is not None:
        client.stop_requested = preemption.requested.is_set
        preemption.on_deadline = tuner.release_running
    log.info("%s (pid %d) asks the chief at %s for trials", worker, os.getpid(), address)
    try:
        tuner.work(**fit_kwargs)
    except SearchOver as e:
        log.info("%s: the search is over (%s); exiting", worker, e)
        return EXIT_OK
    finally:
        watchdog.stop()
        client.close()
    return EXIT_OK  # pragma: no cover - work() only returns by raising
