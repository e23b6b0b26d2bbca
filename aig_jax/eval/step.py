"""The jit-compiled evaluation step: per-example predictions and gate decisions of a batch.

Outputs are replicated on every device, so that each process can read all of them; the
batch's ``mask`` and ``index`` pass through, so padded examples can be dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aig_jax.model.resnet import ModelOutput
from aig_jax.sharding import replicated

Batch = dict[str, jax.Array]

EvalStep = Callable[..., dict[str, jax.Array]]


def eval_outputs(out: ModelOutput, batch: Batch, top_k: int) -> dict[str, jax.Array]:
    """The per-example outputs of an eval step (see :func:`make_eval_step`) from a model output."""
    k = min(top_k, out.logits.shape[-1])
    log_probs = jax.nn.log_softmax(out.logits)
    # A one-hot product rather than a gather: a gather of a batch-1 array sharded over the
    # mesh has no unambiguous output sharding.
    one_hot = jax.nn.one_hot(batch["label"], out.logits.shape[-1], dtype=log_probs.dtype)
    loss = -jnp.sum(log_probs * one_hot, axis=-1)
    return {
        "top": jax.lax.top_k(out.logits, k)[1].astype(jnp.int32),
        "confidence": jnp.exp(jnp.max(log_probs, axis=-1)),
        "loss": loss,
        "gates": out.gates,
        "probs": out.probs,
        "label": batch["label"],
        "mask": batch["mask"],
        "index": batch["index"],
    }


def make_eval_step(model: nn.Module, mesh: jax.sharding.Mesh, *, top_k: int = 5) -> EvalStep:
    """Build ``step(variables, batch, key, gate_mode, thresholds) -> per-example outputs``.

    ``gate_mode`` is static ("argmax", "sample", "open" or "calibrated"); ``key`` feeds the
    Gumbel noise of "sample"; ``thresholds`` [L] is used by "calibrated". Outputs, replicated
    on every device so that each process can read all of them:
    ``top`` [B, k] int32 (classes by decreasing logit), ``confidence`` [B] (max softmax),
    ``loss`` [B], ``gates`` [L, B], ``probs`` [L, B], and the batch's ``label``, ``mask`` and
    ``index`` [B] passed through.
    """

    def step(
        variables: dict[str, Any],
        batch: Batch,
        key: jax.Array,
        gate_mode: str,
        thresholds: jax.Array,
    ) -> dict[str, jax.Array]:
        return masked_eval_outputs(model, variables, batch, key, gate_mode, thresholds, top_k)

    return jax.jit(step, static_argnums=(3,), out_shardings=replicated(mesh))


def masked_eval_outputs(
    model: nn.Module,
    variables: dict[str, Any],
    batch: Batch,
    key: jax.Array,
    gate_mode: str,
    thresholds: jax.Array,
    top_k: int,
) -> dict[str, jax.Array]:
    """The eval step's outputs (see :func:`make_eval_step`) from the masked model, traced."""
    out: ModelOutput = model.apply(  # type: ignore[assignment]  # no mutable collections
        variables,
        batch["image"],
        train=False,
        gate_mode=gate_mode,
        thresholds=thresholds,
        rngs={"gumbel": key},
    )
    return eval_outputs(out, batch, top_k)
