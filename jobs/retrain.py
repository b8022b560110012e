"""Entrypoint of the retrain: the best hyperparameters become the published model.

`python -m jobs.retrain [flags]` is `skin retrain [flags]`; the exit code is the
contract with the Job's podFailurePolicy (skin/errors.py).
"""

import sys

from skin.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
