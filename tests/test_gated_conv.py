"""The Pallas gated convolution (interpret mode on CPU) against XLA's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.inference.gated_conv import gated_conv, tile_sizes


def _reference(x, kernel, gate, stride):
    pad = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32),
        kernel.astype(jnp.float32),
        (stride, stride),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y * gate[:, None, None, None]


@pytest.mark.parametrize(
    ("k", "stride", "size", "pow2_tiles"),
    [
        (3, 1, 8, False),
        (3, 2, 8, False),
        (1, 1, 6, True),  # 6×6 outputs computed on 8×8 tiles (the GPU layout), cropped
        (3, 2, 7, False),
        (3, 1, 5, True),
    ],
)
def test_gated_conv_equals_the_gated_xla_convolution(k, stride, size, pow2_tiles):
    keys = jax.random.split(jax.random.key(k * 10 + stride), 2)
    x = jax.random.normal(keys[0], (3, size, size, 4))
    kernel = jax.random.normal(keys[1], (k, k, 4, 5))
    gate = jnp.array([1.0, 0.0, 1.0])
    got = gated_conv(x, kernel, gate, stride=stride, pow2_tiles=pow2_tiles)
    expected = _reference(x, kernel, gate, stride)
    assert got.shape == expected.shape == (3, -(-size // stride), -(-size // stride), 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[1]).any()  # skipped: zeros


@pytest.mark.parametrize(
    ("k", "stride", "size", "pow2_tiles", "tiles"),
    [
        # 3 row blocks of 3 (9 rows, the last 2 padding), 2 output and 2 input channel blocks.
        (3, 1, 7, False, {"rows": 3, "cout_block": 4, "cin_block": 4}),
        # Stride 2: each row block's input window starts 2·rows further down.
        (3, 2, 11, False, {"rows": 2, "cout_block": 2, "cin_block": 2}),
        # The GPU layout: 14×14 outputs on 16-wide rows, 4 row blocks of 4.
        (1, 1, 14, True, {"rows": 4, "cout_block": 8, "cin_block": 8}),
    ],
)
def test_row_and_channel_tiles_equal_the_gated_xla_convolution(k, stride, size, pow2_tiles, tiles):
    keys = jax.random.split(jax.random.key(size), 2)
    x = jax.random.normal(keys[0], (3, size, size, 8))
    kernel = jax.random.normal(keys[1], (k, k, 8, 8))
    gate = jnp.array([0.0, 1.0, 1.0])
    got = gated_conv(x, kernel, gate, stride=stride, pow2_tiles=pow2_tiles, **tiles)
    expected = _reference(x, kernel, gate, stride)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert not np.asarray(got[0]).any()


def test_tile_sizes_for_resnet50_layers():
    # 56×56 outputs on 64-wide rows: 2 rows (128 pixels) per tile; channels in blocks of 128.
    assert tile_sizes(56, 56, 64, 256) == {"rows": 2, "cout_block": 128, "cin_block": 64}
    # 7×7 outputs (8-wide rows): the whole image (8 padded rows) in one row block.
    assert tile_sizes(7, 7, 512, 512) == {"rows": 8, "cout_block": 128, "cin_block": 128}


def test_gated_conv_keeps_bfloat16_activations():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)).astype(jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))
    gate = jnp.array([0.0, 1.0])
    got = gated_conv(x, kernel, gate)
    assert got.dtype == jnp.bfloat16
    expected = _reference(x, kernel.astype(jnp.bfloat16), gate, 1)
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-2, atol=5e-2)


def test_gated_conv_errors_name_the_bad_shape():
    x = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"\(2, 2, 3, 4\)"):
        gated_conv(x, jnp.zeros((2, 2, 3, 4)), jnp.ones(2))
    with pytest.raises(ValueError, match="5 input channels"):
        gated_conv(x, jnp.zeros((3, 3, 5, 4)), jnp.ones(2))
    with pytest.raises(ValueError, match=r"\(2,\), got \(3,\)"):
        gated_conv(x, jnp.zeros((3, 3, 3, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match="cout_block = 3 must be a positive divisor of 4"):
        gated_conv(x, jnp.zeros((3, 3, 3, 4)), jnp.ones(2), cout_block=3)
    with pytest.raises(ValueError, match="rows = 0"):
        gated_conv(x, jnp.zeros((3, 3, 3, 4)), jnp.ones(2), rows=0)
