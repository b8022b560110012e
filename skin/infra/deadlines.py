"""``activeDeadlineSeconds`` of the Jobs, derived from an experiment's budget.

Nothing may hang forever: a Job past its deadline is failed and its pods are
stopped, whatever they are doing. The deadline must leave room for a normal
search, preemptions included, so it is derived from the budget:

- **epochs of the search**: Hyperband's brackets (the same arithmetic as
  keras-tuner's ``HyperbandOracle``, continued trials counting only their new
  epochs) x ``hyperband_iterations``; random and Bayesian: ``max_trials`` x
  ``max_epochs``; both x ``executions_per_trial``;
- **tune** = ceil(epochs / ``workers``) x ``epoch_seconds`` x 2 (slack for
  preemptions, retries and uneven trials) + the stage's deadline (the chief and
  the workers start with the stage and wait for its data);
- **stage** = 1 h; **retrain** = (``retrain.epochs``, or ``max_epochs`` when 0) x
  ``retrain.ensemble`` x ``epoch_seconds`` x 2 + 30 min (its clock starts when the
  chief un-suspends it);
- everything rounded up to a whole minute.

``epoch_seconds`` is an upper estimate of one epoch's wall time on a worker:
:data:`DEFAULT_EPOCH_SECONDS` unless you know better. The shipped overlays
carry the values for their experiments (tests/test_manifests.py keeps them in
step); after changing the experiment, or to override, print the patch with::

    python -m skin.infra.deadlines --config k8s/tuning/experiment.yaml [--epoch-seconds 120]

and put it in your overlay's ``patches`` (or patch ``activeDeadlineSeconds`` by hand).
"""

from __future__ import annotations

import argparse
import math
import sys

from skin.errors import ConfigError
from skin.infra.config import load_experiment

DEFAULT_EPOCH_SECONDS = 300.0
SLACK = 2.0
STAGE_SECONDS = 3600
RETRAIN_EXTRA_SECONDS = 1800
JOBS = {"stage": "skin-stage", "chief": "skin-chief", "workers": "skin-workers",
        "retrain": "skin-retrain"}


def hyperband_epochs(max_epochs: int, factor: int) -> int:
    """Epochs one Hyperband iteration trains (keras-tuner's bracket arithmetic)."""
    brackets, e = 0, float(max_epochs)
    while e >= 1:
        e /= factor
        brackets += 1
    end0 = math.ceil(1 + math.log(max_epochs, factor))
    total = 0
    for b in range(brackets):
        for r in range(b + 1):
            size = math.ceil(end0 / (b + 1) * factor ** (b - r))
            epochs = math.ceil(max_epochs / factor ** (b - r))
            before = math.ceil(max_epochs / factor ** (b - r + 1)) if r else 0
            total += size * (epochs - before)
    return total


def search_epochs(exp) -> int:
    s = exp.search
    if s.tuner == "hyperband":
        per = hyperband_epochs(s.max_epochs, s.hyperband_factor) * s.hyperband_iterations
    else:
        per = s.max_trials * s.max_epochs
    return per * s.executions_per_trial


def _minute(seconds: float) -> int:
    return int(math.ceil(seconds / 60.0) * 60)


def job_deadlines(exp, epoch_seconds: float = DEFAULT_EPOCH_SECONDS) -> dict[str, int]:
    """activeDeadlineSeconds by role: stage, chief, workers, retrain (see the module doc)."""
    tune = math.ceil(search_epochs(exp) / exp.workers) * epoch_seconds * SLACK + STAGE_SECONDS
    retrain_epochs = exp.retrain.epochs or exp.search.max_epochs
    retrain = retrain_epochs * exp.retrain.ensemble * epoch_seconds * SLACK + RETRAIN_EXTRA_SECONDS
    return {"stage": _minute(STAGE_SECONDS), "chief": _minute(tune), "workers": _minute(tune),
            "retrain": _minute(retrain)}


def kustomize_patches(deadlines: dict[str, int]) -> str:
    """The overlay ``patches`` entries that set the deadlines (YAML)."""
    out = []
    for role, seconds in deadlines.items():
        out.append(f"  - target:\n      kind: Job\n      name: {JOBS[role]}\n    patch: |-\n"
                   f"      - op: replace\n        path: /spec/activeDeadlineSeconds\n"
                   f"        value: {seconds}")
    return "patches:\n" + "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skin.infra.deadlines", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--config", required=True, metavar="FILE", help="experiment file")
    parser.add_argument("--epoch-seconds", type=float, default=DEFAULT_EPOCH_SECONDS,
                        metavar="S", help="upper estimate of one epoch on a worker")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="worker pods: the overlay's `workers=` (default: the file's "
                             "`workers`, or 2)")
    args = parser.parse_args(argv)
    try:
        if not args.epoch_seconds > 0:
            raise ConfigError(f"--epoch-seconds: {args.epoch_seconds!r} is not valid; expected "
                              "a number of seconds > 0")
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers: {args.workers!r} is not valid; expected a number of "
                              "worker pods >= 1")
        env = {} if args.workers is None else {"SKIN_WORKERS": str(args.workers)}
        exp = load_experiment(args.config, env=env)
    except ConfigError as e:
        print(f"skin.infra.deadlines: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(kustomize_patches(job_deadlines(exp, args.epoch_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
