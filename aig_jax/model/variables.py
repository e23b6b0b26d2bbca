"""A model's variables: initialised from a seed, or their shapes without computing anything."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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
