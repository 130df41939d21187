"""Benchmark harness: baselines, a load generator and the runner (see run.py)."""
