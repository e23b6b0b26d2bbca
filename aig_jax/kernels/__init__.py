"""Pallas kernels of the fast inference paths."""
