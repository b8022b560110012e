"""Retrain given configurations on given split seeds, the way the product publishes, and score.

    .venv/bin/python -m bench.quality_configs --out runs/configs-1 \
        --set blocks=4 filters=16 dense_units=128 learning_rate=0.003 --split-seeds 42 43 44

What ``make bench-quality`` does for its extra split seeds (``bench/quality.py``'s
``split_seed_run``: stage ``../shared`` train with the split seed, retrain with the
default experiment's retrain settings, 8-view TTA, threshold on validation, score on
that split's test part), for a configuration named on the command line instead of the
one the search picked: the search's best values with ``--set`` applied over them
(``--best FILE``, a ``best_hyperparameters.json``; default: the hypermodel's defaults
with the experiment's pinned values). So a configuration can be compared with the
searched ones on the same splits, without the search's noise. Writes OUT/configs.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=str(REPO / "skin" / "experiments" / "default.yaml"))
    ap.add_argument("--best", default="", help="best_hyperparameters.json to start from")
    ap.add_argument("--set", nargs="*", default=[], help="name=value over the start")
    ap.add_argument("--split-seeds", type=int, nargs="+", default=[42, 43, 44])
    args = ap.parse_args(argv)

    from bench.quality import DEFAULT_DATA, machine, split_seed_run
    from bench.quality_explore import apply_sets
    from skin.infra.config import load_experiment
    from skin.infra.emulator import Emulator
    from skin.infra.storage import Storage
    from skin.model.hypermodel import default_values

    exp = load_experiment(args.config, env={})
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, source=str(DEFAULT_DATA)))
    if args.best:
        best = json.loads(Path(args.best).read_text())
    else:
        best = {"trial_id": "defaults", "hyperparameters": default_values(exp.search.fixed)}
    values = apply_sets(best["hyperparameters"], args.set)
    best = {**best, "trial_id": "configured", "hyperparameters": values}
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(["python -m bench.quality_configs", *(argv or sys.argv[1:])]),
              "machine": machine(), "hyperparameters": values, "retrain": dataclasses.asdict(
                  exp.retrain), "splits": []}
    with Emulator(bucket=exp.storage.bucket, data_dir=str(out / "bucket")) as emu:
        os.environ.update(emu.environ())
        storage = Storage()
        for seed in args.split_seeds:
            t0 = time.monotonic()
            print(f"split seed {seed}: stage, retrain, score", flush=True)
            row = split_seed_run(exp, storage, best, seed, out / "work")
            row["wall_s"] = round(time.monotonic() - t0, 1)
            report["splits"].append(row)
            t = row["test"]
            print(f"split {seed}: test accuracy {t['accuracy']:.3f} AUC {t['roc_auc']:.3f} "
                  f"sensitivity {t['sensitivity']:.3f} specificity {t['specificity']:.3f} "
                  f"(validation AUC {row['validation']['roc_auc']:.3f})", flush=True)
            (out / "configs.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
