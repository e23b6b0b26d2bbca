"""Benchmarks of aig-jax, each run as ``python -m bench.NAME`` from the repository root."""
