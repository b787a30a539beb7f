"""Benchmarks: the project's way against the naive (CVND-style) way, run with `python -m bench`."""
