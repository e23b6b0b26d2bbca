"""The package's BatchNorm against Flax's: same variables, outputs, statistics and gradients,
with a smaller program."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.batch_norm import BatchNorm, batch_norm_train

EPS = 1e-5
SHAPES = [(8, 4, 4, 6), (32, 16)]  # a convolution's [B, H, W, C] and a gate's [B, C]


def _pair(dtype):
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS, dtype=dtype)
    return flax_bn, BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS, dtype=dtype)


def _inputs(shape, dtype):
    """Inputs far from zero mean and unit variance, and scale/bias away from 1/0."""
    x = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.5
    c = shape[-1]
    params = {"scale": jnp.linspace(0.5, 2.0, c), "bias": jnp.linspace(-1.0, 1.0, c)}
    stats = {"mean": jnp.linspace(-0.2, 0.3, c), "var": jnp.linspace(0.8, 1.4, c)}
    return x.astype(dtype), params, stats


def _apply(module, params, stats, x, train):
    return module.clone(use_running_average=not train).apply(
        {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_variables_outputs_and_running_statistics_as_flax(shape, dtype):
    flax_bn, ours = _pair(dtype)
    x, params, stats = _inputs(shape, dtype)
    shapes = [jax.eval_shape(m.init, jax.random.key(0), x) for m in (flax_bn, ours)]
    assert shapes[0] == shapes[1]
    updated = {}
    for train in (True, False):
        (y_flax, new_flax), (y_ours, new_ours) = (
            _apply(m, params, stats, x, train) for m in (flax_bn, ours)
        )
        assert y_ours.dtype == dtype
        np.testing.assert_array_equal(*(np.asarray(y, np.float32) for y in (y_ours, y_flax)))
        jax.tree.map(np.testing.assert_array_equal, new_ours, new_flax)
        updated[train] = new_ours["batch_stats"]
    # Training moved the running averages towards the batch's statistics (momentum 0.9);
    # evaluation left them as they were.
    x32 = np.asarray(x, np.float32).reshape(-1, shape[-1])
    for name, batch in (("mean", x32.mean(0)), ("var", x32.var(0))):
        expected = 0.9 * stats[name] + 0.1 * batch
        np.testing.assert_allclose(updated[True][name], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(updated[False][name], stats[name])


@pytest.mark.parametrize("shape", SHAPES)
def test_training_gradient_matches_flax_autodiff(shape):
    flax_bn, ours = _pair(jnp.float32)
    x, params, stats = _inputs(shape, jnp.float32)
    weights = jax.random.normal(jax.random.key(1), shape)

    def loss(module, params, x):
        y, _ = _apply(module, params, stats, x, train=True)
        return jnp.sum(jnp.sin(y) * weights)

    grads = [jax.grad(loss, argnums=(1, 2))(m, params, x) for m in (flax_bn, ours)]
    # Sums over up to 128 rows of values of order 1: float32 rounding, not a formula change.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5), *grads)
    assert float(jnp.max(jnp.abs(grads[1][1]))) > 0.1  # a gradient that could be wrong


@pytest.mark.parametrize("with_output", [True, False])
def test_gradients_through_the_returned_statistics(with_output):
    """Mean and variance are differentiable outputs too (and alone, the output's cotangent is a
    symbolic zero)."""
    x, params, _ = _inputs(SHAPES[0], jnp.float32)
    scale, bias = params["scale"], params["bias"]

    def formula(x, scale, bias):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x), (0, 1, 2)) - jnp.square(mean)
        return (x - mean) * (jax.lax.rsqrt(var + EPS) * scale) + bias, mean, var

    def loss(fn, x, scale, bias):
        y, mean, var = fn(x, scale, bias)
        stats = jnp.sum(mean**3) + jnp.sum(jnp.cos(var))
        return stats + jnp.sum(jnp.sin(y)) if with_output else stats

    ours = jax.grad(loss, argnums=(1, 2, 3))(lambda *a: batch_norm_train(*a, EPS), x, scale, bias)
    reference = jax.grad(loss, argnums=(1, 2, 3))(formula, x, scale, bias)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)


def test_training_step_program_is_smaller_than_flax():
    """The reason this module exists: fewer operations for XLA to compile per BatchNorm."""
    x, params, stats = _inputs(SHAPES[0], jnp.bfloat16)

    def operations(module):
        def loss(params, x):
            y, new = _apply(module, params, stats, x, train=True)
            return jnp.sum(y.astype(jnp.float32)), new

        text = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True)).lower(params, x).as_text()
        return sum(" = " in line for line in text.splitlines())

    flax_ops, our_ops = (operations(m) for m in _pair(jnp.bfloat16))
    assert our_ops < 0.8 * flax_ops, (our_ops, flax_ops)
