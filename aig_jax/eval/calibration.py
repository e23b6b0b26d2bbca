"""Calibrated deterministic gates: per-block thresholds that reproduce the sampled rates.

With the reference's stochastic gates a block executes an image with probability p(execute);
thresholding p at 0.5 (argmax) executes far more often when many probabilities sit a little
above 0.5 (AIG-110 at t = 0.7: 72% of blocks sampled, 95% under argmax). "calibrated" gates
keep decisions deterministic but move each block's threshold so that, on training images, the
block executes as often as it does under sampling.

Decisions are ``p > threshold`` (strict), the comparison of argmax mode, so thresholds of 0.5
everywhere reproduce argmax exactly.
"""

from __future__ import annotations

import numpy as np

#: Threshold of a block that must execute every image (p ≥ 0 > -1).
ALWAYS = -1.0


def fit_thresholds(probs: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """[L] float32 thresholds such that the fraction of images with ``probs > thr`` is ``rates``.

    Args:
      probs: [N, L] p(execute) of N (training) images at each of L blocks.
      rates: [L] target execution rates in [0, 1], e.g. the blocks' mean sampled rates.

    For block l the threshold lies between the k-th and (k+1)-th largest probability, k =
    round(rate · N), so exactly k images execute (1/N is the resolution). Where probabilities
    tie across that boundary exactly k is impossible and the tied images are skipped (fewer
    executions, never more). Rate 1 gives :data:`ALWAYS`; rate 0 the largest probability.
    """
    probs = np.asarray(probs, np.float32)
    rates = np.asarray(rates, np.float64)
    if probs.ndim != 2 or rates.shape != (probs.shape[1],):
        raise ValueError(
            f"expected probs [N, L] and rates [L], got shapes {probs.shape} and {rates.shape}"
        )
    if len(probs) == 0:
        raise ValueError("cannot fit thresholds on zero images")
    if ((rates < 0) | (rates > 1)).any():
        raise ValueError(f"rates must lie in [0, 1], got {rates.tolist()}")
    n = len(probs)
    ordered = -np.sort(-probs, axis=0)  # [N, L], largest first
    thresholds = np.empty(probs.shape[1], np.float32)
    for layer, rate in enumerate(rates):
        k = round(float(rate) * n)
        if k >= n:
            thresholds[layer] = ALWAYS
            continue
        below = ordered[k, layer]  # the largest probability that must not execute
        if k == 0:
            thresholds[layer] = below
            continue
        above = ordered[k - 1, layer]
        # The midpoint is safer than ``below`` against tiny numerical differences between
        # passes, but in float32 it may round onto ``above``; then fall back to ``below``.
        mid = np.float32((float(above) + float(below)) / 2)
        thresholds[layer] = mid if below <= mid < above else below
    return thresholds


def rates_under(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[L] fraction of the [N, L] ``probs`` above the [L] ``thresholds`` (calibrated rates)."""
    return (np.asarray(probs) > np.asarray(thresholds)[None, :]).mean(axis=0)
