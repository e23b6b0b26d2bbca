"""Jit-compiled train and evaluation steps over the ``('data',)`` mesh.

The train step draws the Gumbel noise from ``fold_in(key, step)`` (so no RNG state is
checkpointed and a resumed run draws the same noise), computes CE + λ·target-rate loss and
applies the optimizer. Gradients, losses and BatchNorm statistics are over the *global* batch:
under ``jit`` a batch-sharded mean is a cross-device mean (synchronised BatchNorm), whereas the
reference's DataParallel normalised each GPU's share separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from aig_jax.losses import total_loss
from aig_jax.models import ModelOutput
from aig_jax.sharding import replicated
from aig_jax.train_state import TrainState

Batch = dict[str, jax.Array]

#: Pixel values span 0 … PIXEL_MAX (uint8 images).
PIXEL_MAX = 255.0


def normalise_pixels(pixels: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(pixels / 255 - mean) / std`` per channel, traced: pixels [..., 3] in 0–255 (uint8 or
    float) → float32 [..., 3]; ``mean``/``std`` on the 0–1 scale, as the host pipeline's."""
    scale = 1.0 / (PIXEL_MAX * jnp.asarray(std, jnp.float32))
    shift = jnp.asarray(mean, jnp.float32) / jnp.asarray(std, jnp.float32)
    return pixels.astype(jnp.float32) * scale - shift


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all of ``tree``'s leaves together (a float32 scalar).

    One reduction over the leaves' concatenation: a sum per leaf, as in ``optax.tree.norm``,
    compiles to a small kernel per parameter array (about 250 more launches per AIG-ResNet-110
    train step on a GPU).
    """
    flat, _ = ravel_pytree(tree)
    return jnp.sqrt(jnp.sum(jnp.square(flat.astype(jnp.float32))))


TrainStep = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    targets: np.ndarray,
    *,
    target_weight: float,
    normalize: str = "gated",
    learning_rate: optax.Schedule | None = None,
    donate: bool = True,
    pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
) -> TrainStep:
    """Build ``step(state, batch, key) -> (state, metrics)``, jit-compiled with donated state.

    Args:
      model: a gated ResNet (its call returns a ModelOutput).
      tx: the optimizer.
      targets: [L] target rates (1 = ungated block, left out of the loss).
      target_weight: λ of the target-rate loss.
      normalize: "gated" or "all" (see :func:`aig_jax.losses.target_rate_loss`).
      learning_rate: schedule whose value is reported in the metrics.
      donate: donate the input state's buffers (they are dead after the call).
      pixel_stats: ``(mean, std)`` on the 0–1 scale: the batch's images are then uint8 pixels
        [B, H, W, 3], normalised on the device (see :func:`normalise_pixels`).

    ``batch`` holds ``image`` [B, H, W, C] float32 (normalised; uint8 with ``pixel_stats``)
    and ``label`` [B] int32, sharded over ``data``. Metrics are scalars except
    ``gate_rates`` [L] (execution rate of each block).
    """
    targets_arr = jnp.asarray(targets, jnp.float32)

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(key, state.step)
        images = (
            batch["image"]
            if pixel_stats is None
            else normalise_pixels(batch["image"], *pixel_stats)
        )

        def loss_fn(params: Any) -> tuple[jax.Array, tuple]:
            out, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                gate_mode="sample",
                rngs={"gumbel": rng},
                mutable=["batch_stats"],
            )
            loss, parts = total_loss(
                out.logits,
                batch["label"],
                out.gates,
                targets_arr,
                target_weight=target_weight,
                normalize=normalize,
            )
            return loss, (out, updates["batch_stats"], parts)

        (loss, (out, batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "ce": parts["ce"],
            "target_loss": parts["target_loss"],
            "accuracy": jnp.mean(jnp.argmax(out.logits, -1) == batch["label"]),
            "gate_rates": jnp.mean(out.gates, axis=1),
            "grad_norm": global_norm(grads),
        }
        if learning_rate is not None:
            metrics["lr"] = jnp.asarray(learning_rate(state.step), jnp.float32)
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state)
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


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
