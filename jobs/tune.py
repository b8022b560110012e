"""Entrypoint of the tune: the chief or a worker of the search, as KERASTUNER_TUNER_ID says.

`python -m jobs.tune [flags]` is `skin tune [flags]`; the exit code is the
contract with the Job's podFailurePolicy (skin/errors.py).
"""

import sys

from skin.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
