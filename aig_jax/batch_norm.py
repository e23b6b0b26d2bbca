"""BatchNorm over every axis but the last, with a hand-written gradient.

:class:`BatchNorm` computes what ``flax.linen.BatchNorm`` computes with the options this
package uses (statistics in float32, variance as E[x²] − E[x]² clipped at 0, running averages
``momentum · old + (1 − momentum) · batch``) and has the same variables: params ``scale`` and
``bias``, batch_stats ``mean`` and ``var``, each [C] float32. Checkpoints and converted weights
load into either.

What differs is the training gradient. Differentiating Flax's BatchNorm automatically gives
about 85 XLA operations per BatchNorm, forward and backward; the BatchNorms were two thirds of
a gated block's operations, and XLA's compile time grows with the operation count.
:func:`batch_norm_train` has the textbook gradient (two sums over the batch and one
elementwise pass): the gated AIG-ResNet-110 train step for an H100, compiled ahead of time on
2 CPU cores, took 40–43 s instead of 55 s.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero


def _axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _normalise(
    x: jax.Array, mean: jax.Array, inv: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
    """``(x − mean) · (inv · scale) + bias`` in float32, in the order of Flax's BatchNorm."""
    return (x.astype(jnp.float32) - mean) * (inv * scale) + bias


def _forward(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]:
    """``batch_norm_train``'s outputs and the residuals its gradient reads."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, _axes(x))
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x32), _axes(x)) - jnp.square(mean))
    inv = jax.lax.rsqrt(var + epsilon)
    return (_normalise(x32, mean, inv, scale, bias), mean, var), (x, mean, inv, scale)


def _forward_with_residuals(
    x: CustomVJPPrimal, scale: CustomVJPPrimal, bias: CustomVJPPrimal, epsilon: float
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]:
    return _forward(x.value, scale.value, bias.value, epsilon)


def _backward(
    epsilon: float, residuals: tuple[jax.Array, ...], cotangents: tuple[Any, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    del epsilon
    x, mean, inv, scale = residuals
    dy, dmean, dvar = cotangents
    n = x.size // x.shape[-1]
    centred = x.astype(jnp.float32) - mean
    normed = centred * inv
    dy = jnp.zeros_like(normed) if isinstance(dy, SymbolicZero) else dy
    dbias = jnp.sum(dy, _axes(x))
    dscale = jnp.sum(dy * normed, _axes(x))
    dx = (scale * inv) * (dy - dbias / n - normed * (dscale / n))
    # The returned statistics' own gradients: the running averages stop theirs (zeros, which
    # JAX passes here as symbolic zeros that cost nothing).
    if not isinstance(dmean, SymbolicZero):
        dx = dx + dmean / n
    if not isinstance(dvar, SymbolicZero):
        dx = dx + centred * (2.0 / n * dvar)
    return dx.astype(x.dtype), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalise ``x`` [..., C] by its own statistics over every axis but the last.

    Returns ``(y, mean, var)``: ``y`` [..., C] float32 ``= (x − mean) · rsqrt(var + epsilon) ·
    scale + bias``, and the batch ``mean`` and (biased) ``var``, each [C] float32. ``scale`` and
    ``bias`` are [C] float32. All three outputs are differentiable; the gradient is that of the
    formula with the variance unclipped (it differs only where E[x²] − E[x]² rounds below 0).
    """
    return _forward(x, scale, bias, epsilon)[0]


batch_norm_train.defvjp(_forward_with_residuals, _backward, symbolic_zeros=True)


class BatchNorm(nn.Module):
    """Flax's BatchNorm for channels-last inputs [..., C], with :func:`batch_norm_train`'s
    gradient in training.

    Attributes:
      use_running_average: normalise with the running statistics (evaluation) rather than the
        batch's (training, which also updates the running statistics).
      momentum: decay of the running averages (Flax convention: 0.9 == PyTorch's 0.1).
      epsilon: added to the variance.
      dtype: dtype of the output (the input's when None); statistics are float32.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise ``x`` [..., C] channel by channel; returns [..., C] in ``dtype``."""
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        dtype = x.dtype if self.dtype is None else self.dtype
        if self.use_running_average:
            inv = jax.lax.rsqrt(running_var.value + self.epsilon)
            return _normalise(x, running_mean.value, inv, scale, bias).astype(dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            keep = self.momentum
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            running_mean.value = keep * running_mean.value + (1 - keep) * mean
            running_var.value = keep * running_var.value + (1 - keep) * var
        return y.astype(dtype)
