"""Benchmarks of the product's code; their figures go to BENCHMARKS.md.

Each module is a thin driver over ``skin`` (no copied metrics, split or private
members), run from the repository root as ``python -m bench.<name>``; the Makefile's
``bench-*`` targets run the recorded ones.
"""
