"""Inference that really skips the residual branches whose gate is 0.

The masked residual ``relu(shortcut(x) + z · F(x))`` computes F for every image. Here the
model's own blocks compute F only where it is needed, with the same outputs (up to
floating-point rounding), by passing the model another ``gated_branch`` (see
:mod:`aig_jax.model.blocks`):

* :func:`cond_branch`: the block's branch runs under ``lax.cond`` when at least one image of
  the (per-device) batch executes it. At batch 1 — edge deployment — the decision is a scalar
  and the time per image falls with the execution rate, on any backend.
* :func:`pallas_branch`: each convolution of the branch is the Pallas kernel
  :func:`aig_jax.inference.gated_conv.gated_conv`, which skips the images whose gate is 0 (for
  accelerators at batch scale; on CPU the kernel only interprets, for tests).

:func:`make_fast_eval_step` is a drop-in replacement of :func:`aig_jax.eval.step.make_eval_step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aig_jax.eval.step import Batch, EvalStep, eval_outputs, masked_eval_outputs
from aig_jax.inference.gated_conv import gated_conv, tile_sizes
from aig_jax.model.blocks import GatedBranch, ResidualBlock, masked_branch
from aig_jax.model.resnet import ModelOutput, ResNet
from aig_jax.sharding import replicated

PATHS = ("auto", "cond", "pallas", "masked")

#: Largest image side at which "auto" uses the Pallas kernel on accelerators: at ImageNet sizes
#: one image per program is too big a tile.
PALLAS_MAX_IMAGE = 32

#: Largest output (pixels × channels) computed as one whole-image tile; larger layers are cut
#: with :func:`~aig_jax.inference.gated_conv.tile_sizes`.
WHOLE_IMAGE_TILE = 32 * 32 * 16


def cond_branch(block: ResidualBlock, x: jax.Array, decision: jax.Array) -> jax.Array:
    """``z · F(x)`` [B, H/s, W/s, C_out], with F computed only if some image executes it."""
    b, h, w, _ = x.shape
    shape = (
        b,
        -(-h // block.strides),
        -(-w // block.strides),
        block.out_features_of(block.features),
    )

    def skip(block: ResidualBlock, x: jax.Array, decision: jax.Array) -> jax.Array:
        return jnp.zeros(shape, x.dtype)

    return nn.cond(jnp.any(decision > 0), masked_branch, skip, block, x, decision)


def _spatial(value: Any) -> tuple[int, ...]:
    """An ``nn.Conv`` attribute given as an int or per spatial dimension, per dimension."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _padding(padding: Any, kernel: int) -> int | None:
    """The padding of every spatial side that ``padding`` means, if all sides agree."""
    if isinstance(padding, str):  # "SAME" and "VALID" pad nothing around a 1×1 kernel
        return 0 if kernel == 1 and padding in ("SAME", "VALID") else None
    if isinstance(padding, int):
        return padding
    sides = {int(p) for pair in padding for p in (pair if isinstance(pair, Sequence) else [pair])}
    return sides.pop() if len(sides) == 1 else None


def _gated_conv(conv: nn.Conv, x: jax.Array, decision: jax.Array) -> jax.Array:
    """``conv(x)`` [B, H, W, C_in] → [B, H/s, W/s, C_out] with the Pallas kernel, skipping the
    images whose decision is 0; raises ``ValueError`` for a convolution it cannot compute."""
    k, strides = _spatial(conv.kernel_size), _spatial(conv.strides or 1)
    supported = (
        k[0] == k[1]
        and k[0] % 2 == 1
        and strides[0] == strides[1]
        and _padding(conv.padding, k[0]) == k[0] // 2
        and not conv.use_bias
        and conv.feature_group_count == 1
        and _spatial(conv.kernel_dilation or 1) == (1, 1)
        and _spatial(conv.input_dilation or 1) == (1, 1)
    )
    if not supported:
        raise ValueError(
            "the Pallas path computes bias-free square convolutions with odd kernels padded "
            f"kernel // 2 and no groups or dilation; {conv.name} is not one"
        )
    stride = strides[0]
    kernel = conv.variables["params"]["kernel"]
    _, h, w, c_in = x.shape
    h_out, w_out, c_out = -(-h // stride), -(-w // stride), kernel.shape[-1]
    tiles = (
        {} if h_out * w_out * c_out <= WHOLE_IMAGE_TILE else tile_sizes(h_out, w_out, c_in, c_out)
    )
    return gated_conv(x, kernel, decision, stride=stride, **tiles)


def pallas_branch(block: ResidualBlock, x: jax.Array, decision: jax.Array) -> jax.Array:
    """``z · F(x)`` [B, H/s, W/s, C_out], each convolution of F skipping the images whose
    decision is 0 (their normalisations and activations still run, and are masked)."""

    def gated(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            return _gated_conv(context.module, args[0], decision)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(gated):
        return masked_branch(block, x, decision)


BRANCHES: dict[str, GatedBranch] = {
    "masked": masked_branch,
    "cond": cond_branch,
    "pallas": pallas_branch,
}


def choose_path(per_device_batch: int, image_size: int) -> str:
    """The path "auto" takes: "cond" at batch 1 or on CPU (where Pallas only interprets),
    "pallas" on accelerators for images up to :data:`PALLAS_MAX_IMAGE`, else "masked"."""
    if per_device_batch == 1 or jax.default_backend() == "cpu":
        return "cond"
    return "pallas" if image_size <= PALLAS_MAX_IMAGE else "masked"


def make_fast_eval_step(
    model: ResNet, mesh: jax.sharding.Mesh, *, top_k: int = 5, path: str = "auto"
) -> EvalStep:
    """Drop-in :func:`aig_jax.eval.step.make_eval_step` whose time falls with the execution
    rate.

    Same call ``step(variables, batch, key, gate_mode, thresholds)`` and outputs (replicated).
    Each device runs the model on its share of the batch with the branches of ``path`` ("auto"
    picks with :func:`choose_path`; "masked" is the plain model); gate mode "sample" draws
    noise like the masked model, so it runs the masked model.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    data = jax.P("data")

    def step(
        variables: dict[str, Any],
        batch: Batch,
        key: jax.Array,
        gate_mode: str,
        thresholds: jax.Array,
    ) -> dict[str, jax.Array]:
        chosen = path
        if path == "auto":
            chosen = choose_path(
                batch["image"].shape[0] // mesh.devices.size, batch["image"].shape[1]
            )
        if gate_mode == "sample" or chosen == "masked":
            return masked_eval_outputs(model, variables, batch, key, gate_mode, thresholds, top_k)

        def local(variables: Any, images: jax.Array, thresholds: jax.Array) -> tuple:
            out = model.apply(
                variables,
                images,
                gate_mode=gate_mode,
                thresholds=thresholds,
                gated_branch=BRANCHES[chosen],
            )
            return tuple(out)

        # Each device skips for its own images: its cond predicate and kernel grid are local.
        per_block = jax.P(None, "data")
        parts = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(jax.P(), data, jax.P()),
            out_specs=(data, per_block, per_block),
            check_vma=False,
        )(variables, batch["image"], thresholds)
        return eval_outputs(ModelOutput(*parts), batch, top_k)

    return jax.jit(step, static_argnums=(3,), out_shardings=replicated(mesh))
