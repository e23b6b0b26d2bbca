"""A Pallas convolution that skips the images whose gate is 0.

The convolution is computed per image as a sum of ``k²`` matmuls over the image's
[H_out·W_out, C_in] rows (one per kernel tap, read as shifted — and for stride 2, strided —
windows of the padded image), so there is no im2col buffer and no gather or scatter of
activations: the grid runs over images and ``pl.when(gate > 0)`` skips the whole tile of an
image that does not execute, writing zeros instead, so that ``shortcut + branch`` stays the
masked residual's value.

On CPU the kernel runs in Pallas's interpret mode (for tests and reference); on GPU and TPU it
is compiled. Pallas's Triton lowering (GPU) needs power-of-2 array sizes, so there the output
tile is padded to power-of-2 height and width (e.g. 56 → 64 for ResNet-50 at 224²) and cropped
after the call; channel counts of the ResNets are already powers of 2. On an H100 the kernel
compiled and matched XLA's convolution (to TF32 rounding) at CIFAR sizes (32×32×16, and
16×16×32 with stride 2); at ResNet-50 sizes the whole-image tile (56×56 rows padded to 64×64)
did not finish compiling and running within 5 minutes: a grid over row blocks of each image is
the next step there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def default_interpret() -> bool:
    """Interpret mode on CPU, where Pallas cannot compile; real compilation elsewhere."""
    return jax.default_backend() == "cpu"


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _kernel(
    gate_ref: jax.Array,
    x_ref: jax.Array,
    w_ref: jax.Array,
    s_ref: jax.Array,
    b_ref: jax.Array,
    o_ref: jax.Array,
    *,
    kernel: int,
    stride: int,
    relu: bool,
) -> None:
    _, h_out, w_out, c_out = o_ref.shape
    c_in = x_ref.shape[-1]

    @pl.when(gate_ref[0, 0] > 0)
    def _execute() -> None:
        acc = jnp.zeros((h_out * w_out, c_out), jnp.float32)
        for dy in range(kernel):
            for dx in range(kernel):
                window = x_ref[
                    pl.ds(0, 1),
                    pl.ds(dy, h_out, stride=stride),
                    pl.ds(dx, w_out, stride=stride),
                    :,
                ]
                acc += jnp.dot(
                    window.reshape(h_out * w_out, c_in),
                    w_ref[dy, dx],
                    preferred_element_type=jnp.float32,
                )
        acc = acc * s_ref[...].astype(jnp.float32) + b_ref[...].astype(jnp.float32)
        if relu:
            acc = jnp.maximum(acc, 0.0)
        o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)

    @pl.when(gate_ref[0, 0] <= 0)
    def _skip() -> None:
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("stride", "relu", "interpret", "pow2_tiles"))
def gated_conv(
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    gate: jax.Array,
    *,
    stride: int = 1,
    relu: bool = False,
    interpret: bool | None = None,
    pow2_tiles: bool | None = None,
) -> jax.Array:
    """``gate[b] · act(conv(x, kernel) · scale + bias)`` per image, skipping where gate is 0.

    Args:
      x: [B, H, W, C_in] activations.
      kernel: [k, k, C_in, C_out] weights (HWIO), k odd; padding k // 2 as PyTorch's.
      scale, bias: [C_out] per-channel affine (an inference BatchNorm's), in float32.
      gate: [B] decisions; images with gate 0 get an all-zero output and cost no matmuls.
      stride: spatial stride.
      relu: apply ReLU before writing.
      interpret: force Pallas's interpret mode (default: on CPU only).
      pow2_tiles: compute each image's output on a power-of-2 height × width and crop it
        (default: on GPU, whose Triton lowering needs it).

    Returns:
      [B, ceil(H / stride), ceil(W / stride), C_out] in ``x.dtype``.
    """
    k = kernel.shape[0]
    if kernel.shape[1] != k or k % 2 != 1:
        raise ValueError(f"expected an odd square kernel [k, k, C_in, C_out], got {kernel.shape}")
    if kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"kernel has {kernel.shape[2]} input channels, x has {x.shape[-1]}")
    if gate.shape != (x.shape[0],):
        raise ValueError(f"gate must have shape ({x.shape[0]},), got {gate.shape}")
    b, h, w, c_in = x.shape
    c_out = kernel.shape[-1]
    pad = k // 2
    h_out, w_out = -(-h // stride), -(-w // stride)
    if pow2_tiles is None:
        pow2_tiles = jax.default_backend() == "gpu"
    h_tile, w_tile = (_next_pow2(h_out), _next_pow2(w_out)) if pow2_tiles else (h_out, w_out)
    # Zero rows/columns below and right of the usual padding feed the cropped part of the tile.
    hp, wp = (h_tile - 1) * stride + k, (w_tile - 1) * stride + k
    xp = jnp.pad(x, ((0, 0), (pad, max(hp - h - pad, pad)), (pad, max(wp - w - pad, pad)), (0, 0)))
    hp, wp = xp.shape[1], xp.shape[2]
    call = pl.pallas_call(
        functools.partial(_kernel, kernel=k, stride=stride, relu=relu),
        out_shape=jax.ShapeDtypeStruct((b, h_tile, w_tile, c_out), x.dtype),
        grid=(b,),
        in_specs=[
            pl.BlockSpec((1, 1), lambda i: (i, 0)),
            pl.BlockSpec((1, hp, wp, c_in), lambda i: (i, 0, 0, 0)),
            pl.BlockSpec((k, k, c_in, c_out), lambda i: (0, 0, 0, 0)),
            pl.BlockSpec((1, c_out), lambda i: (0, 0)),
            pl.BlockSpec((1, c_out), lambda i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, h_tile, w_tile, c_out), lambda i: (i, 0, 0, 0)),
        interpret=default_interpret() if interpret is None else interpret,
    )
    out = call(
        gate.astype(jnp.float32)[:, None],
        xp,
        kernel.astype(x.dtype),
        scale.reshape(1, c_out),
        bias.reshape(1, c_out),
    )
    return out[:, :h_out, :w_out]
