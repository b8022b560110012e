"""Entrypoint of the stage: the source images become checked, split TFRecord shards in the bucket.

`python -m jobs.stage [flags]` is `skin stage [flags]`; the exit code is the
contract with the Job's podFailurePolicy (skin/errors.py).
"""

import sys

from skin.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage", *sys.argv[1:]]))
