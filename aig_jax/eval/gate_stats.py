"""Statistics of gate decisions over a dataset: what the inference graphs look like.

All functions take host arrays of per-image decisions ``gates`` [N, L] (1 = block executed)
and return NumPy arrays, so they serve both the training loop's periodic evaluation and the
evaluation report.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster import hierarchy


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


def cluster_order(matrix: np.ndarray) -> np.ndarray:
    """[K] order of the rows of a [K, L] class × block matrix that groups similar classes.

    Average-linkage hierarchical clustering (scipy) on the Euclidean distance between rows;
    the leaves of the dendrogram, left to right, put classes with similar gate patterns next
    to each other. Missing entries (NaN: a class without images) count as the block's mean.
    """
    matrix = np.asarray(matrix, np.float64)
    if matrix.shape[0] < 3:
        return np.arange(matrix.shape[0])
    known = ~np.isnan(matrix)
    col_mean = np.where(known, matrix, 0.0).sum(axis=0) / np.maximum(known.sum(axis=0), 1)
    filled = np.where(known, matrix, col_mean[None, :])
    tree = hierarchy.linkage(filled, method="average", metric="euclidean")
    return np.asarray(hierarchy.leaves_list(hierarchy.optimal_leaf_ordering(tree, filled)))


def by_executed_count(
    gates: np.ndarray, correct: np.ndarray, confidence: np.ndarray
) -> dict[str, np.ndarray]:
    """Accuracy and confidence of the images grouped by how many blocks they executed.

    ``gates`` [N, L], ``correct`` [N] bool, ``confidence`` [N]. Returns ``count`` [L + 1]
    (images per number of executed blocks), and ``accuracy`` and ``confidence`` [L + 1]
    (means over those images; NaN where there are none).
    """
    executed = executed_counts(gates)
    n = gates.shape[1] + 1
    count = np.bincount(executed, minlength=n).astype(np.float64)
    hits = np.bincount(executed, weights=np.asarray(correct, np.float64), minlength=n)
    conf = np.bincount(executed, weights=np.asarray(confidence, np.float64), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "count": count.astype(np.int64),
            "accuracy": hits / count,
            "confidence": conf / count,
        }
