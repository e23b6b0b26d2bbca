"""Training state: a plain pytree of everything a resume needs."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from aig_jax.model.variables import init_variables


@flax.struct.dataclass
class TrainState:
    """step (int32 scalar), params, batch_stats and opt_state: everything a resume needs."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        """The model variables ``{"params", "batch_stats"}`` for ``Module.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    seed: int,
) -> TrainState:
    """A fresh TrainState (step 0) with variables initialised from ``seed``.

    Call it inside ``jax.jit(..., out_shardings=...)`` to create the state directly sharded.
    """
    variables = init_variables(model, image_shape, seed)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )
