"""The jit-compiled train step over the ``('data',)`` mesh.

The train step draws the Gumbel noise from ``fold_in(key, step)`` (so no RNG state is
checkpointed and a resumed run draws the same noise), computes CE + λ·target-rate loss and
applies the optimizer. Gradients, losses and BatchNorm statistics are over the *global* batch:
under ``jit`` a batch-sharded mean is a cross-device mean (synchronised BatchNorm), whereas the
reference's DataParallel normalised each GPU's share separately.

Each step reports in its ``finite`` metric whether its loss, gradients and new state (parameters,
BatchNorm statistics, optimizer state) are finite; with ``on_nonfinite="skip_step"`` a step that
is not keeps the state it was given (under ``"stop"`` the training loop ends the run there).

On the CPU backend each residual block's output passes through an optimisation barrier that
XLA is told to keep until after fusion (``fusion_barriers``). Without it XLA:CPU fuses the
elementwise chain of a whole stage (BatchNorm, gate, residual add and ReLU of every block
before) into each backward-pass fusion that reads a block's output, recomputing it there, so
the step's cost grows with the square of the depth. The barrier is the identity on values and
gradients; GPU and TPU programs are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aig_jax.data.preprocess import normalise_pixels
from aig_jax.model.blocks import ResidualBlock
from aig_jax.train.losses import total_loss
from aig_jax.train.state import TrainState

Batch = dict[str, jax.Array]


#: What a step with a non-finite loss, gradient or update does (``config.on_nonfinite``):
#: "stop" the run (the loop raises), or "skip_step" (the step keeps the state it was given).
ON_NONFINITE = ("stop", "skip_step")

TrainStep = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]

#: XLA options that keep optimisation barriers through fusion: XLA:CPU otherwise expands them
#: into their operands before fusing, so they would separate nothing.
KEEP_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _barrier_after_block(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    """A Flax method interceptor: a residual block's output [B, H, W, C] behind an
    optimisation barrier where the program is compiled for the CPU (for a GPU or TPU, from a
    CPU host, it stays as it is), so that XLA fuses no elementwise work across blocks; the
    gate's decisions and other calls as they are. The model code is unchanged."""
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, ResidualBlock) and context.method_name == "__call__":
        y, gate = out
        barrier = jax.lax.optimization_barrier
        return jax.lax.platform_dependent(y, cpu=barrier, default=lambda x: x), gate
    return out


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
    on_nonfinite: str = "stop",
    fusion_barriers: bool | None = None,
) -> TrainStep:
    """Build ``step(state, batch, key) -> (state, metrics)``, jit-compiled with donated state.

    Args:
      model: a gated ResNet (its call returns a ModelOutput).
      tx: the optimizer.
      targets: [L] target rates (1 = ungated block, left out of the loss).
      target_weight: λ of the target-rate loss.
      normalize: "gated" or "all" (see :func:`aig_jax.train.losses.target_rate_loss`).
      learning_rate: schedule whose value is reported in the metrics.
      donate: donate the input state's buffers (they are dead after the call).
      pixel_stats: ``(mean, std)`` on the 0–1 scale: the batch's images are then uint8 pixels
        [B, H, W, 3], normalised on the device (see :func:`normalise_pixels`).
      on_nonfinite: one of :data:`ON_NONFINITE`; "skip_step" keeps the parameters, optimizer
        state and BatchNorm statistics of a step whose ``finite`` metric is False.
      fusion_barriers: separate the residual blocks for XLA's fusion (an optimisation barrier
        after each, compiled with :data:`KEEP_BARRIERS`); None: on when JAX's default backend
        is the CPU. The results are the same either way.

    ``batch`` holds ``image`` [B, H, W, C] float32 (normalised; uint8 with ``pixel_stats``)
    and ``label`` [B] int32, sharded over ``data``. Metrics are scalars except
    ``gate_rates`` [L] (execution rate of each block); ``finite`` is a bool.
    """
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    targets_arr = jnp.asarray(targets, jnp.float32)
    barriers = jax.default_backend() == "cpu" if fusion_barriers is None else fusion_barriers

    def step(state: TrainState, batch: Batch, key: jax.Array) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(key, state.step)
        images = (
            batch["image"]
            if pixel_stats is None
            else normalise_pixels(batch["image"], *pixel_stats)
        )

        def loss_fn(params: Any) -> tuple[jax.Array, tuple]:
            with nn.intercept_methods(_barrier_after_block) if barriers else nullcontext():
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
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves((params, batch_stats, opt_state)):
            finite &= jnp.all(jnp.isfinite(leaf))
        if on_nonfinite == "skip_step":
            params, batch_stats, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, batch_stats, opt_state),
                (state.params, state.batch_stats, state.opt_state),
            )
        metrics = {
            "loss": loss,
            "ce": parts["ce"],
            "target_loss": parts["target_loss"],
            "accuracy": jnp.mean(jnp.argmax(out.logits, -1) == batch["label"]),
            "gate_rates": jnp.mean(out.gates, axis=1),
            "grad_norm": grad_norm,
            "finite": finite,
        }
        if learning_rate is not None:
            metrics["lr"] = jnp.asarray(learning_rate(state.step), jnp.float32)
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state)
        return new_state, metrics

    return jax.jit(
        step,
        donate_argnums=(0,) if donate else (),
        compiler_options=KEEP_BARRIERS if barriers else None,
    )
