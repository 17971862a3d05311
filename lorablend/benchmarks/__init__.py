"""Benchmarks: `python -m lorablend.benchmarks.scale` (see docs/PERFORMANCE.md)."""
