"""Container entrypoints, one per role: thin wrappers over :func:`skin.cli.main`.

The image runs them as ``python -m jobs.<role>``; every setting comes from the
experiment file and the environment, parsed by :mod:`skin.infra.config`.
"""
