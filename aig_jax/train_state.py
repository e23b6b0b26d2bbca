"""Training state (a plain pytree) and the optimizer of the reference recipe.

The optimizer is PyTorch's SGD as the reference uses it: weight decay added to the gradient of
every parameter (BatchNorm and biases included), heavy-ball momentum, a piecewise-constant
learning rate, and an optional learning-rate factor for the gates' parameters.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


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


def learning_rate_schedule(config: Any, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per step: ``config.learning_rate`` × ``lr_decay`` at each boundary epoch,
    after an optional linear warm-up of ``warmup_epochs``."""
    boundaries = {
        round(e * steps_per_epoch): float(config.lr_decay) for e in config.lr_boundaries_epochs
    }
    schedule = optax.piecewise_constant_schedule(float(config.learning_rate), boundaries)
    warmup = round(config.get("warmup_epochs", 0) * steps_per_epoch)
    if warmup == 0:
        return schedule
    ramp = optax.linear_schedule(0.0, float(config.learning_rate), warmup)
    return optax.join_schedules([ramp, lambda s: schedule(s + warmup)], [warmup])


def gate_mask(params: Any, which: str) -> Any:
    """Pytree of bools marking the gate parameters that get ``gate_lr_factor``.

    ``which`` is "fc2" (the gates' last layer, as the reference's CIFAR script), "gate" (every
    gate layer, as its ImageNet script's "fc*") or "none".
    """
    if which not in ("fc2", "gate", "none"):
        raise ValueError(f"gate_lr_params must be 'fc2', 'gate' or 'none', got {which!r}")

    def mark(path: tuple[Any, ...], _: Any) -> bool:
        keys = [getattr(p, "key", None) for p in path]
        if which == "none" or "gate" not in keys:
            return False
        return which == "gate" or "fc2" in keys

    return jax.tree_util.tree_map_with_path(mark, params)


def make_optimizer(config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum, coupled weight decay on all parameters and the gate lr factor."""
    schedule = learning_rate_schedule(config, steps_per_epoch)
    parts = [
        optax.add_decayed_weights(float(config.weight_decay)),
        optax.trace(decay=float(config.momentum), nesterov=bool(config.get("nesterov", False))),
        optax.scale_by_learning_rate(schedule),
    ]
    factor = float(config.get("gate_lr_factor", 1.0))
    which = config.get("gate_lr_params", "fc2")
    if factor != 1.0:
        parts.append(optax.masked(optax.scale(factor), lambda p: gate_mask(p, which)))
    return optax.chain(*parts)


def init_variables(model: nn.Module, image_shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Initial ``{"params", "batch_stats"}`` for images of ``image_shape`` [H, W, C]."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    rngs = {"params": jax.random.key(seed), "gumbel": jax.random.key(seed + 1)}
    variables = model.init(rngs, x, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def abstract_variables(
    model: nn.Module, image_shape: tuple[int, ...] = (32, 32, 3)
) -> dict[str, Any]:
    """ShapeDtypeStructs of :func:`init_variables` (nothing is computed).

    The variables of a ResNet do not depend on the image size, only on its channels.
    """
    return dict(jax.eval_shape(functools.partial(init_variables, model, image_shape, 0)))


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
