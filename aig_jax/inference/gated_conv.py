"""A Pallas convolution that skips the images whose gate is 0.

The convolution is computed as a sum of ``k²`` matmuls over [rows·W_out, C_in] slices of the
image (one per kernel tap, read as shifted — and for stride 2, strided — windows of the padded
image), so there is no im2col buffer and no gather or scatter of activations. The grid runs
over (image, block of output rows, block of output channels); ``pl.when(gate > 0)`` skips
every tile of an image that does not execute, writing zeros instead, so that ``shortcut +
branch`` stays the masked residual's value. By default a tile is the whole image and all
channels (one program per image); ``rows``, ``cout_block`` and ``cin_block`` cut it smaller
for large layers, so that a tile's accumulator and weight slices stay small.

On CPU the kernel runs in Pallas's interpret mode (for tests and reference); on GPU and TPU it
is compiled. Pallas's Triton lowering (GPU) needs power-of-2 array sizes, so there the output
tile is padded to power-of-2 height and width (e.g. 56 → 64 for ResNet-50 at 224²) and cropped
after the call; channel counts of the ResNets are already powers of 2. The whole-image tile
suits CIFAR sizes; at ResNet-50 sizes a whole-image tile (56×56 rows padded to 64×64) is too
large to compile in reasonable time, which is what the row and channel blocks are for
(:func:`tile_sizes` picks them).
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


def tile_sizes(h_out: int, w_out: int, c_in: int, c_out: int) -> dict[str, int]:
    """Row and channel blocks for a large layer: about 128 output pixels and at most 128
    output and 128 input channels per tile (powers of 2, as the GPU lowering needs).

    Returns keyword arguments of :func:`gated_conv` (``rows``, ``cout_block``, ``cin_block``).
    """
    w_tile = _next_pow2(w_out)
    rows = max(1, min(_next_pow2(h_out), 128 // w_tile))
    return {"rows": rows, "cout_block": min(c_out, 128), "cin_block": min(c_in, 128)}


def _kernel(
    gate_ref: jax.Array,
    x_ref: jax.Array,
    w_ref: jax.Array,
    o_ref: jax.Array,
    *,
    kernel: int,
    stride: int,
    cin_block: int,
) -> None:
    _, rows, w_out, c_out = o_ref.shape
    c_in = x_ref.shape[-1]
    first = pl.program_id(1) * rows * stride  # first padded input row of this row block

    @pl.when(gate_ref[0, 0] > 0)
    def _execute() -> None:
        acc = jnp.zeros((rows * w_out, c_out), jnp.float32)
        for dy in range(kernel):
            for dx in range(kernel):
                for c in range(0, c_in, cin_block):
                    window = x_ref[
                        pl.ds(0, 1),
                        pl.ds(first + dy, rows, stride=stride),
                        pl.ds(dx, w_out, stride=stride),
                        pl.ds(c, cin_block),
                    ]
                    acc += jnp.dot(
                        window.reshape(rows * w_out, cin_block),
                        w_ref[dy, dx, pl.ds(c, cin_block), :],
                        preferred_element_type=jnp.float32,
                    )
        o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)

    @pl.when(gate_ref[0, 0] <= 0)
    def _skip() -> None:
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _block(name: str, value: int | None, full: int) -> int:
    """``value`` (default ``full``) checked to divide ``full``."""
    value = full if value is None else value
    if value <= 0 or full % value:
        raise ValueError(f"{name} = {value} must be a positive divisor of {full}")
    return value


@functools.partial(
    jax.jit,
    static_argnames=(
        "stride",
        "interpret",
        "pow2_tiles",
        "rows",
        "cout_block",
        "cin_block",
    ),
)
def gated_conv(
    x: jax.Array,
    kernel: jax.Array,
    gate: jax.Array,
    *,
    stride: int = 1,
    interpret: bool | None = None,
    pow2_tiles: bool | None = None,
    rows: int | None = None,
    cout_block: int | None = None,
    cin_block: int | None = None,
) -> jax.Array:
    """``gate[b] · conv(x, kernel)`` per image, skipping the images whose gate is 0.

    Args:
      x: [B, H, W, C_in] activations.
      kernel: [k, k, C_in, C_out] weights (HWIO), k odd; padding k // 2 as PyTorch's.
      gate: [B] decisions; images with gate 0 get an all-zero output and cost no matmuls.
      stride: spatial stride.
      interpret: force Pallas's interpret mode (default: on CPU only).
      pow2_tiles: compute each image's output on a power-of-2 height × width and crop it
        (default: on GPU, whose Triton lowering needs it).
      rows: output rows per tile (default: the whole image); the output height is padded up to
        a multiple of it and cropped.
      cout_block: output channels per tile, a divisor of C_out (default C_out).
      cin_block: input channels per matmul, a divisor of C_in (default C_in).

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
    cout_block = _block("cout_block", cout_block, c_out)
    cin_block = _block("cin_block", cin_block, c_in)
    pad = k // 2
    h_out, w_out = -(-h // stride), -(-w // stride)
    if pow2_tiles is None:
        pow2_tiles = jax.default_backend() == "gpu"
    h_tile, w_tile = (_next_pow2(h_out), _next_pow2(w_out)) if pow2_tiles else (h_out, w_out)
    rows = h_tile if rows is None else rows
    if rows <= 0:
        raise ValueError(f"rows = {rows} must be positive")
    h_tile = -(-h_tile // rows) * rows
    # Zero rows/columns below and right of the usual padding feed the cropped part of the tile.
    hp, wp = (h_tile - 1) * stride + k, (w_tile - 1) * stride + k
    xp = jnp.pad(x, ((0, 0), (pad, max(hp - h - pad, pad)), (pad, max(wp - w - pad, pad)), (0, 0)))
    hp, wp = xp.shape[1], xp.shape[2]
    call = pl.pallas_call(
        functools.partial(_kernel, kernel=k, stride=stride, cin_block=cin_block),
        out_shape=jax.ShapeDtypeStruct((b, h_tile, w_tile, c_out), x.dtype),
        grid=(b, h_tile // rows, c_out // cout_block),
        in_specs=[
            pl.BlockSpec((1, 1), lambda i, r, j: (i, 0)),
            # The whole padded image: a row block reads its rows and halo from it.
            pl.BlockSpec((1, hp, wp, c_in), lambda i, r, j: (i, 0, 0, 0)),
            pl.BlockSpec((k, k, c_in, cout_block), lambda i, r, j: (0, 0, 0, j)),
        ],
        out_specs=pl.BlockSpec((1, rows, w_tile, cout_block), lambda i, r, j: (i, r, 0, j)),
        interpret=default_interpret() if interpret is None else interpret,
    )
    out = call(gate.astype(jnp.float32)[:, None], xp, kernel.astype(x.dtype))
    return out[:, :h_out, :w_out]
