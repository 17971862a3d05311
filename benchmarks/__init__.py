"""Benchmarks: `python -m benchmarks.scale` (see docs/PERFORMANCE.md)."""
