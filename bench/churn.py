"""Preemption churn vs no faults: what preemptions cost a search.

    PYTHONPATH=tests python -m bench.churn [--trials 8] [--epochs 4] [--epoch-seconds 1]
                                           [--kills 10] [--chief-kills 2] [--out FILE]

Runs the same tiny search (tests/tuning_entry.py: a chief and 2 workers over loopback gRPC,
the bucket in the storage emulator, ``--epoch-seconds`` per epoch) twice: once without
faults, once with the churn of tests/test_preemption.py (SIGTERM to a random worker
mid-trial ``--kills`` times and to the chief ``--chief-kills`` times, each restarted at once
with the same id). Reports the wall-time ratio, the epochs the workers began in each run
(the difference is the lost work), and the attempts by kind from ``tuner/result.json``.
Targets (issue 13): lost work <= one epoch per preemption, 0 failed attempts, wall time
<= 1.3x at 10 preemptions.

The search and the churn are the tests' own harness (tests/test_tuning.py's ``Search``,
tests/churn.py's ``drive``), so tests/ must be on the import path: ``make bench-churn``
sets ``PYTHONPATH=tests``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def one_run(tmp: Path, emulator, args, *, faults: bool) -> dict:
    from churn import drive, epochs_begun
    from skin.infra.storage import Storage
    from skin.tuning import load_result
    from test_tuning import Search

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    tmp.mkdir(parents=True)
    s = Search(tmp, bucket, emulator, entry_args=["--epoch-seconds", str(args.epoch_seconds)],
               max_trials=args.trials, max_epochs=args.epochs, lease_seconds=30,
               max_trial_retries=1, max_consecutive_failed_trials=2)
    workers = ["tuner0", "tuner1"]
    t0 = time.monotonic()
    try:
        for role in ["chief", *workers]:
            s.start(role)
        churn = drive(s, workers, worker_kills=args.kills, chief_kills=args.chief_kills,
                      epoch_seconds=args.epoch_seconds, seed=args.seed) if faults else None
        codes = {"chief": s.procs["chief"].wait(timeout=900)}
        for w in workers:
            codes[w] = s.procs[w].wait(timeout=120)
        wall = time.monotonic() - t0
    finally:
        s.stop_all()
    result = load_result(Storage(), s.exp).to_json()
    return {
        "faults": faults,
        "wall_s": round(wall, 1),
        "exit_codes": codes,
        "outcome": result["outcome"],
        "trials": len(result["trials"]),
        "epochs_begun": epochs_begun(s),
        "epochs_in_trials": sum(t["epochs"] for t in result["trials"]),
        "attempts_by_status": result["attempts_by_status"],
        "worker_preemptions": len(churn.kills) if churn else 0,
        "chief_preemptions": len(churn.chief_kills) if churn else 0,
        "release_exit_codes": sorted({k.code for k in churn.kills + churn.chief_kills})
        if churn else [],
        "max_seconds_to_exit": round(max((k.seconds for k in churn.kills + churn.chief_kills),
                                         default=0.0), 2) if churn else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--epoch-seconds", type=float, default=1.0)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--chief-kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()

    if importlib.util.find_spec("test_tuning") is None:
        parser.error("the tests' harness (tests/test_tuning.py, tests/churn.py) is not "
                     "importable: run from the repository root with PYTHONPATH=tests "
                     "(make bench-churn does)")
    from skin.infra.emulator import Emulator

    with Emulator() as emulator, tempfile.TemporaryDirectory(prefix="bench-churn-") as tmp:
        os.environ.update(emulator.environ())
        clean = one_run(Path(tmp) / "clean", emulator, args, faults=False)
        churn = one_run(Path(tmp) / "churn", emulator, args, faults=True)
    kills = churn["worker_preemptions"] + churn["chief_preemptions"]
    report = {
        "settings": vars(args),
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "clean": clean,
        "churn": churn,
        "wall_ratio": round(churn["wall_s"] / clean["wall_s"], 2),
        "lost_epochs": churn["epochs_begun"] - clean["epochs_begun"],
        "lost_epochs_per_worker_preemption": round(
            (churn["epochs_begun"] - clean["epochs_begun"]) / max(1, churn["worker_preemptions"]),
            2),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"\nchurn: {churn['worker_preemptions']} worker + {churn['chief_preemptions']} chief "
          f"preemptions ({kills} in all); wall {churn['wall_s']} s vs {clean['wall_s']} s "
          f"({report['wall_ratio']}x); epochs begun {churn['epochs_begun']} vs "
          f"{clean['epochs_begun']} (lost {report['lost_epochs']}); attempts "
          f"{churn['attempts_by_status']}", file=sys.stderr)
    ok = churn["outcome"] == "completed" and churn["attempts_by_status"]["failed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
