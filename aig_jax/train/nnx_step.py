"""A train step for forks written in Flax NNX, on the Linen model wrapped by ``nnx.bridge.ToNNX``.

The model stays a Linen module; ``nnx.bridge.ToNNX(model, rngs=nnx.Rngs(params=0, gumbel=1))``
holds its variables as ``nnx.Param`` and ``nnx.BatchStat`` after ``lazy_init``. Called on its
own (no Linen parent), the wrapper applies the module with every collection immutable unless
the call passes ``mutable``, so a training call, whose BatchNorm layers write their running
statistics, must pass ``mutable=["batch_stats"]``: the wrapper then writes the new statistics
back into its ``BatchStat`` variables. Evaluation (``train=False``) mutates nothing and needs
no flag.

The gates draw their noise from the wrapper's ``gumbel`` stream. An ``nnx.RngStream`` gives
``fold_in(key, count)`` and counts up by one per call, the construction of
:func:`aig_jax.train.step.make_train_step` (``fold_in(key, step)``) with the stream's count in
place of the step; the count lives in the model's state, so a checkpoint of ``nnx.state(model)``
resumes the same noise.

This module imports ``flax.nnx``, which the rest of the package does not; nothing in the package
imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aig_jax.train.losses import total_loss
from aig_jax.train.step import Batch

#: ``step(model, optimizer, batch) -> metrics`` of :func:`make_nnx_train_step`.
NNXTrainStep = Callable[[nnx.bridge.ToNNX, nnx.Optimizer[Any], Batch], dict[str, jax.Array]]


def make_nnx_train_step(
    targets: np.ndarray, *, target_weight: float, normalize: str = "gated"
) -> NNXTrainStep:
    """Build ``step(model, optimizer, batch) -> metrics``, compiled with ``nnx.jit``.

    One optimizer step on CE + λ·target-rate loss, the loss of
    :func:`aig_jax.train.step.make_train_step`. The step updates its arguments in place: the
    parameters and optimizer state, the BatchNorm statistics and the rng counts.

    Args:
      targets: [L] target rates (1 = ungated block, left out of the loss).
      target_weight: λ of the target-rate loss.
      normalize: "gated" or "all" (see :func:`aig_jax.train.losses.target_rate_loss`).

    The step's ``model`` is an ``nnx.bridge.ToNNX`` around a gated ResNet, initialised with
    ``lazy_init`` and with a ``gumbel`` stream in its rngs; ``optimizer`` is
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)``. ``batch`` holds ``image`` [B, H, W, C] float32
    (normalised) and ``label`` [B] int32. Metrics are the scalars ``loss``, ``ce``,
    ``target_loss`` and ``accuracy``, and ``gate_rates`` [L] (execution rate of each block).
    """
    objective = functools.partial(
        total_loss,
        targets=jnp.asarray(targets, jnp.float32),
        target_weight=target_weight,
        normalize=normalize,
    )

    def loss_fn(model: nnx.bridge.ToNNX, batch: Batch) -> tuple[jax.Array, tuple[Any, Any]]:
        out = model(batch["image"], train=True, gate_mode="sample", mutable=["batch_stats"])
        loss, parts = objective(out.logits, batch["label"], out.gates)
        return loss, (out, parts)

    @nnx.jit
    def step(
        model: nnx.bridge.ToNNX, optimizer: nnx.Optimizer[Any], batch: Batch
    ) -> dict[str, Any]:
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, (out, parts)), grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return {
            "loss": loss,
            "ce": parts["ce"],
            "target_loss": parts["target_loss"],
            "accuracy": jnp.mean(jnp.argmax(out.logits, -1) == batch["label"]),
            "gate_rates": jnp.mean(out.gates, axis=1),
        }

    return step
