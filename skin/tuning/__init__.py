"""Distributed keras-tuner search that survives faults and scales: chief, workers, results.

    run_chief(ctx: skin.context.RoleContext) -> exit code
    run_worker(ctx: skin.context.RoleContext) -> exit code
    load_best(storage, exp) -> BestTrial # <root>/tuner/best_hyperparameters.json (skin.infra.artifacts)
    load_result(storage, exp) -> SearchResult  # <root>/tuner/result.json (skin.infra.artifacts)

Modules: ``oracle`` (keras-tuner's oracles with leases), ``oracle_state`` (their per-trial state),
``journal`` (that state in the bucket), ``chief`` (the chief's life),
``servicer`` (the gRPC servicer), ``client`` (a worker's line to the chief), ``tuner`` (the
worker's keras-tuner Tuner: trials, checkpoints through the bucket),
``checkpoints`` (a trial's files in the bucket, the per-epoch
checkpoint), ``worker`` (the worker's life), ``results`` (what a search leaves behind),
``protocol`` (what travels beside keras-tuner's messages), ``hooks`` (the typed
metrics hooks, no-op by default).

Importing this package is cheap; TensorFlow loads when a role starts.
"""

from __future__ import annotations

import gc

from skin.tuning.results import load_best, load_result


def run_chief(ctx) -> int:
    """Serve the oracle until the search ends (see skin.tuning.chief)."""
    from skin.tuning.chief import run_chief as _run

    code = _run(ctx)
    _about_to_exit()
    return code


def run_worker(ctx) -> int:
    """Run the chief's trials until the search ends (see skin.tuning.worker)."""
    from skin.tuning.worker import run_worker as _run

    code = _run(ctx)
    _about_to_exit()
    return code


def _about_to_exit() -> None:
    # A role's process ends right after it returns. The interpreter's last garbage collection
    # of TensorFlow's and Keras' object graph takes 0.5-5 s on a busy machine; frozen objects
    # are skipped, so the chief leaves within moments of the last trial (a Job completes
    # sooner). Harmless if the process goes on: frozen objects just stay.
    gc.freeze()


__all__ = ["run_chief", "run_worker", "load_best", "load_result"]
