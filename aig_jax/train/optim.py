"""The optimiser of the reference recipe and its learning-rate schedule.

PyTorch's SGD as the reference uses it: weight decay added to the gradient of every parameter
(BatchNorm and biases included), heavy-ball momentum, a piecewise-constant learning rate after
an optional linear warm-up, and an optional learning-rate factor for the gates' parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

#: Which gate parameters get ``config.gate_lr_factor``: the gates' last layer (the reference's
#: CIFAR script), every gate layer (its ImageNet script's "fc*"), or none.
GATE_LR_PARAMS = ("fc2", "gate", "none")


def learning_rate_schedule(config: Any, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per step: ``config.learning_rate`` × ``lr_decay`` at each boundary epoch,
    after a linear warm-up of ``warmup_epochs`` (none when 0)."""
    boundaries = {
        round(e * steps_per_epoch): float(config.lr_decay) for e in config.lr_boundaries_epochs
    }
    schedule = optax.piecewise_constant_schedule(float(config.learning_rate), boundaries)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if warmup == 0:
        return schedule
    ramp = optax.linear_schedule(0.0, float(config.learning_rate), warmup)
    return optax.join_schedules([ramp, lambda s: schedule(s + warmup)], [warmup])


def gate_mask(params: Any, which: str) -> Any:
    """Pytree of bools marking the gate parameters that get ``gate_lr_factor``.

    ``which`` is one of :data:`GATE_LR_PARAMS`.
    """
    if which not in GATE_LR_PARAMS:
        raise ValueError(f"gate_lr_params must be one of {GATE_LR_PARAMS}, got {which!r}")

    def mark(path: tuple[Any, ...], _: Any) -> bool:
        keys = [getattr(p, "key", None) for p in path]
        if which == "none" or "gate" not in keys:
            return False
        return which == "gate" or "fc2" in keys

    return jax.tree_util.tree_map_with_path(mark, params)


def make_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum, coupled weight decay on all parameters and the gate lr factor, at
    the learning rates of ``schedule`` (:func:`learning_rate_schedule`)."""
    parts = [
        optax.add_decayed_weights(float(config.weight_decay)),
        optax.trace(decay=float(config.momentum), nesterov=bool(config.nesterov)),
        optax.scale_by_learning_rate(schedule),
    ]
    if float(config.gate_lr_factor) != 1.0:
        scale = optax.scale(float(config.gate_lr_factor))
        parts.append(optax.masked(scale, lambda p: gate_mask(p, config.gate_lr_params)))
    return optax.chain(*parts)
