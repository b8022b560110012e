"""The images/s pair of `make bench-quality` alone, for the code of one source tree.

    .venv/bin/python -m bench.quality_ips --out runs/bench-quality [--rounds 5]

Reuses an earlier run's bucket (``OUT/bucket``: staged data and best configuration) and
runs ``bench.quality.images_per_second`` (the staged tf.data pipeline against the same
images in memory, alternating epochs, medians after the cache fills) with the ``skin``
package of the working directory's checkout, so two versions of the input pipeline can be
compared on the same machine minutes apart: check out the older one with
``git worktree add DIR COMMIT`` and run the same command from ``DIR`` (``python -m`` puts
the working directory first on the import path; the report names the tree it measured).
Checkouts from before bench/ was a package (2026-11-28) take ``python bench/quality_ips.py
--tree DIR`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the OUT of an earlier make bench-quality")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()

    import skin
    from bench import quality
    from skin.data import dataset as skin_data
    from skin.infra.config import load_experiment
    from skin.infra.emulator import Emulator
    from skin.infra.storage import Storage, join

    tree = Path(skin.__file__).resolve().parents[1]
    exp = load_experiment(out / "experiment.yaml", env={})
    with Emulator(bucket=exp.storage.bucket, data_dir=str(out / "bucket")) as emu:
        os.environ.update(emu.environ())
        storage = Storage()
        best = storage.read_json(join(exp.tuner_uri, "best_hyperparameters.json"))
        data_dir = Path(skin_data.sync_data(storage, exp.data_uri, out / "bench-work" / "data"))
    result = quality.images_per_second(exp, best, data_dir, rounds=args.rounds)
    print(json.dumps({"tree": str(tree), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
