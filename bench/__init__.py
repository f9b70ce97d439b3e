"""Benchmarks B1-B4 (see docs/BENCHMARKS.md); run with ``python -m bench``."""
