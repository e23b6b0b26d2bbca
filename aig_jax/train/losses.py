"""Classification and target-rate losses.

The target-rate loss of ConvNet-AIG pulls each gated block's batch execution rate towards its
target: ``mean over gated layers l of (mean_b z[l, b] - t_l)**2``. Blocks with target 1 have
no gate and are left out. The reference's ImageNet code divides by all blocks instead of the
gated ones (``normalize="all"``), which only rescales λ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: How the target-rate loss is averaged: over the gated layers, or over all layers (the
#: reference's ImageNet code).
NORMALIZE = ("gated", "all")


def target_rate_loss(
    gates: jax.Array, targets: jax.Array, *, normalize: str = "gated"
) -> jax.Array:
    """Squared distance between batch execution rates and target rates.

    Args:
      gates: [L, B] gate decisions (0/1, straight-through gradients).
      targets: [L] target rates; layers with target >= 1 are excluded.
      normalize: "gated" divides by the number of gated layers, "all" by L (the reference's
        ImageNet code).

    Returns:
      Scalar loss (0 when no layer is gated).
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    targets = jnp.asarray(targets, jnp.float32)
    if gates.ndim != 2 or targets.shape != gates.shape[:1]:
        raise ValueError(
            f"gates must be [L, B] and targets [L]; got {gates.shape} and {targets.shape}"
        )
    gated = targets < 1.0
    rates = jnp.mean(gates.astype(jnp.float32), axis=1)
    sq = jnp.where(gated, (rates - targets) ** 2, 0.0)
    denom = jnp.sum(gated) if normalize == "gated" else gates.shape[0]
    return jnp.sum(sq) / jnp.maximum(denom, 1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits [B, K] against integer labels [B].

    A one-hot product rather than a gather: its gradient is dense, so it keeps the batch
    sharding on an explicit-axes mesh.
    """
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(one_hot * log_probs, axis=-1))


def total_loss(
    logits: jax.Array,
    labels: jax.Array,
    gates: jax.Array,
    targets: jax.Array,
    *,
    target_weight: float,
    normalize: str = "gated",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CE + λ·target loss; returns the total and its parts ``{"ce", "target_loss"}``."""
    ce = cross_entropy(logits, labels)
    tl = target_rate_loss(gates, targets, normalize=normalize)
    return ce + target_weight * tl, {"ce": ce, "target_loss": tl}
