import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.model.blocks import BasicBlock, BatchNorm, Bottleneck, Conv


def _block(cls, features, train=False, **kwargs):
    norm = functools.partial(BatchNorm, use_running_average=not train)
    return cls(features, conv=Conv, norm=norm, **kwargs)


def _set_gate_bias(variables, execute: bool):
    """Force every image's decision: fc2 bias (−10, 10) opens the gate, (10, −10) closes it."""
    v = jax.tree.map(lambda a: a, variables)
    v["params"]["gate"]["fc2"]["bias"] = jnp.array([-10.0, 10.0] if execute else [10.0, -10.0])
    return v


def _without_gate(variables):
    return {k: {n: p for n, p in col.items() if n != "gate"} for k, col in variables.items()}


def _bn(x, params, stats, eps=1e-5):
    return (x - stats["mean"]) / jnp.sqrt(stats["var"] + eps) * params["scale"] + params["bias"]


CASES = [
    (BasicBlock, 8, 1, 8),  # identity shortcut
    (BasicBlock, 16, 2, 8),  # projection shortcut
    (Bottleneck, 4, 1, 16),  # identity (4 * 4 == 16)
    (Bottleneck, 8, 2, 16),  # projection
]


@pytest.mark.parametrize(("cls", "features", "strides", "cin"), CASES)
def test_gate_zero_passes_shortcut_and_gate_one_equals_plain_block(cls, features, strides, cin):
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, cin))
    gated = _block(cls, features, strides=strides, gated=True)
    v = gated.init(
        {"params": jax.random.key(1), "gumbel": jax.random.key(2)},
        x,
        train=False,
        gate_mode="argmax",
    )
    # Non-trivial running statistics, so that BatchNorm is not the identity.
    v["batch_stats"] = jax.tree.map(
        lambda a: a + jax.random.uniform(jax.random.key(3), a.shape, minval=0.1, maxval=0.5),
        v["batch_stats"],
    )

    closed, gate = gated.apply(_set_gate_bias(v, False), x, train=False, gate_mode="argmax")
    np.testing.assert_array_equal(gate.decision, 0.0)
    if "shortcut_conv" in v["params"]:
        k = v["params"]["shortcut_conv"]["kernel"]
        sc = jax.lax.conv_general_dilated(
            x, k, (strides, strides), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        sc = _bn(sc, v["params"]["shortcut_bn"], v["batch_stats"]["shortcut_bn"])
        np.testing.assert_allclose(closed, jax.nn.relu(sc), rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(closed, jax.nn.relu(x))

    opened, gate = gated.apply(_set_gate_bias(v, True), x, train=False, gate_mode="argmax")
    np.testing.assert_array_equal(gate.decision, 1.0)
    plain = _block(cls, features, strides=strides, gated=False)
    expected, plain_gate = plain.apply(_without_gate(v), x, train=False, gate_mode="argmax")
    np.testing.assert_array_equal(opened, expected)
    np.testing.assert_array_equal(plain_gate.decision, 1.0)
    assert not np.allclose(opened, closed)


def test_masked_residual_decides_per_image():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
    block = _block(BasicBlock, 8, gated=True)
    v = block.init({"params": jax.random.key(1)}, x, train=False, gate_mode="argmax")
    v["params"]["gate"]["fc2"]["kernel"] = jax.random.normal(jax.random.key(4), (16, 2))
    opened, gate = block.apply(v, x, train=False, gate_mode="open")
    p = np.asarray(gate.prob)
    assert p[0] != p[1]
    # A threshold between the two probabilities opens exactly one of the two images.
    mixed, gate = block.apply(v, x, train=False, gate_mode="calibrated", threshold=p.mean())
    first = int(np.argmax(p))
    np.testing.assert_array_equal(gate.decision, np.arange(2) == first)
    np.testing.assert_array_equal(mixed[first], opened[first])
    np.testing.assert_array_equal(mixed[1 - first], jax.nn.relu(x[1 - first]))
