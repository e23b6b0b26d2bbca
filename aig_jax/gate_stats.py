"""Statistics of gate decisions over a dataset: what the inference graphs look like.

All functions take host arrays of per-image decisions ``gates`` [N, L] (1 = block executed)
and return NumPy arrays, so they serve both the training loop's periodic evaluation and the
evaluation report.
"""

from __future__ import annotations

import numpy as np


def layer_rates(gates: np.ndarray) -> np.ndarray:
    """[L] fraction of images that execute each block, from ``gates`` [N, L]."""
    return np.asarray(gates, np.float64).mean(axis=0)


def class_layer_rates(gates: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, L] execution rate of each block over the images of each class (NaN for no images).

    ``gates`` [N, L], ``labels`` [N] int in [0, K).
    """
    gates = np.asarray(gates, np.float64)
    labels = np.asarray(labels, np.int64)
    sums = np.zeros((num_classes, gates.shape[1]))
    np.add.at(sums, labels, gates)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def executed_counts(gates: np.ndarray) -> np.ndarray:
    """[N] number of blocks each image executed."""
    return np.asarray(gates).sum(axis=1).astype(np.int64)


def executed_histogram(gates: np.ndarray) -> np.ndarray:
    """[L + 1] number of images that executed exactly 0, 1, …, L blocks."""
    return np.bincount(executed_counts(gates), minlength=gates.shape[1] + 1)


def top_classes_per_layer(matrix: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """For each block, the ``k`` classes that use it most and least.

    ``matrix`` [K, L] from :func:`class_layer_rates`; returns (most [L, k], least [L, k])
    class indices, most first / least first. Classes without images are ranked last.
    """
    filled_hi = np.where(np.isnan(matrix), -np.inf, matrix)
    filled_lo = np.where(np.isnan(matrix), np.inf, matrix)
    k = min(k, matrix.shape[0])
    most = np.argsort(-filled_hi, axis=0, kind="stable")[:k].T
    least = np.argsort(filled_lo, axis=0, kind="stable")[:k].T
    return most, least
