"""Benchmarks: a hand-written JAX baseline and the harness `scripts/bench.py` runs."""
