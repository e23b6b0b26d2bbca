"""Inference that really skips the residual branches whose gate is 0.

The masked residual ``relu(shortcut(x) + z · F(x))`` computes F for every image; here F is not
computed where it is not needed, with the same outputs (up to floating-point rounding: each
inference BatchNorm becomes a per-channel scale and shift in its convolution's epilogue):

* ``"cond"``: each gated block runs its branch under ``lax.cond`` when at least one image of
  the (per-device) batch executes it. At batch 1 — edge deployment — the decision is a scalar
  and the time per image falls with the execution rate, on any backend.
* ``"pallas"``: the branch's convolutions are :func:`aig_jax.kernels.gated_conv.gated_conv`,
  which skips the tiles of the images whose gate is 0 (for accelerators at batch scale; the
  kernel runs in interpret mode on CPU, for tests).

Both paths reuse the model's gate modules (any gate honouring the contract of
:mod:`aig_jax.gates`) and accept the blocks of :mod:`aig_jax.blocks` whose branch is a chain
``conv1/bn1 → ReLU → … → convN/bnN`` as their ``conv_specs`` declare.

:func:`make_fast_eval_step` is a drop-in replacement of :func:`aig_jax.steps.make_eval_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aig_jax.blocks import BN_EPSILON
from aig_jax.gates import GateOutput, check_gate_mode
from aig_jax.kernels.gated_conv import gated_conv, tile_sizes
from aig_jax.models import BlockInfo, ModelOutput, ResNet
from aig_jax.sharding import replicated
from aig_jax.steps import Batch, EvalStep, eval_outputs, masked_eval_outputs

PATHS = ("auto", "cond", "pallas", "masked")

#: A convolution and its BatchNorm: {"kernel": [k, k, C_in, C_out], "scale", "bias": [C_out]}.
Folded = dict[str, Any]
#: conv(x, folded, stride, relu) → activations; the two paths differ only in this function.
ConvFn = Callable[[jax.Array, Folded, int, bool], jax.Array]


def fold_conv_bn(kernel: jax.Array, bn_params: Any, bn_stats: Any) -> Folded:
    """An inference BatchNorm as the per-channel affine of the bias-free convolution before it.

    ``bn(conv(x, W)) = conv(x, W) · s + (β − μ · s)`` with ``s = γ / sqrt(σ² + ε)``.
    ``kernel``: [k, k, C_in, C_out] (kept: scaling the weights instead would cost a pass over
    every weight per call, more than the activations' epilogue at batch 1); returns it with
    ``scale`` and ``bias`` [C_out].
    """
    s = bn_params["scale"] / jnp.sqrt(bn_stats["var"] + BN_EPSILON)
    return {"kernel": kernel, "scale": s, "bias": bn_params["bias"] - bn_stats["mean"] * s}


def _fold(params: Any, stats: Any, conv_name: str, bn_name: str) -> Folded:
    return fold_conv_bn(params[conv_name]["kernel"], params[bn_name], stats[bn_name])


def _branch_length(info: BlockInfo) -> int:
    specs = info.block_cls.conv_specs(info.in_features, info.features, info.strides)
    return sum(spec.part == "branch" for spec in specs)


def fold_variables(model: ResNet, variables: dict[str, Any]) -> dict[str, Any]:
    """The model's inference weights, each convolution paired with its BatchNorm's affine.

    Returns ``{"stem": Folded, "blocks": [per block {"branch": [Folded …], "shortcut":
    Folded (projection blocks only), "gate": the gate's variables}], "linear": Dense params}``.
    Raises ``ValueError`` naming a block whose variables do not follow the conv/bn chain.
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    blocks = []
    for info in model.block_infos():
        p, s = params[info.name], stats.get(info.name, {})
        n = _branch_length(info)
        names = [(f"conv{i + 1}", f"bn{i + 1}") for i in range(n)]
        missing = [name for pair in names for name in pair if name not in p]
        if missing:
            raise ValueError(
                f"block {info.name} ({info.block_cls.__name__}) has no {missing}: the skipping "
                "paths need a branch of conv1/bn1 … convN/bnN"
            )
        block: dict[str, Any] = {"branch": [_fold(p, s, c, b) for c, b in names]}
        if info.downsampling:
            block["shortcut"] = _fold(p, s, "shortcut_conv", "shortcut_bn")
        if info.gated:
            block["gate"] = {k: v[info.name]["gate"] for k, v in variables.items()}
        blocks.append(block)
    return {
        "stem": _fold(params, stats, "conv1", "bn1"),
        "blocks": blocks,
        "linear": params["linear"],
    }


def xla_conv(x: jax.Array, folded: Folded, stride: int, relu: bool) -> jax.Array:
    """``act(conv(x, kernel) · scale + bias)``: x [B, H, W, C_in] → [B, H/s, W/s, C_out]."""
    kernel = folded["kernel"].astype(x.dtype)
    pad = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = y * folded["scale"].astype(x.dtype) + folded["bias"].astype(x.dtype)
    return nn.relu(y) if relu else y


def _branch(x: jax.Array, convs: list[Folded], info: BlockInfo, conv_fn: ConvFn) -> jax.Array:
    """The residual branch F(x) from folded convolutions; the block's stride is on the conv
    its ``conv_specs`` puts it on."""
    specs = info.block_cls.conv_specs(info.in_features, info.features, info.strides)
    for i, (folded, spec) in enumerate(zip(convs, specs, strict=False)):
        x = conv_fn(x, folded, spec.strides, i < len(convs) - 1)
    return x


def _gate(
    model: ResNet, variables: Any, x: jax.Array, mode: str, threshold: jax.Array | float
) -> GateOutput:
    out: GateOutput = model.gate_cls().apply(  # type: ignore[assignment]  # no mutables
        variables, x, train=False, mode=mode, threshold=threshold
    )
    return out


def skip_forward(
    model: ResNet,
    folded: dict[str, Any],
    x: jax.Array,
    *,
    gate_mode: str = "argmax",
    thresholds: jax.Array | None = None,
    path: str = "cond",
) -> ModelOutput:
    """The model's inference output for ``x`` [B, H, W, C], skipping non-executed branches.

    ``folded`` comes from :func:`fold_variables`; ``gate_mode`` is "argmax", "calibrated"
    (with ``thresholds`` [L]) or "open"; ``path`` is "cond" or "pallas". Returns
    ModelOutput(logits [B, K], gates [L, B], probs [L, B]) equal to the masked model's.
    """
    check_gate_mode(gate_mode)
    if gate_mode == "sample":
        raise ValueError("the skipping paths are deterministic; gate mode 'sample' is not one")
    if path not in ("cond", "pallas"):
        raise ValueError(f"unknown skipping path {path!r}; expected 'cond' or 'pallas'")
    infos = model.block_infos()
    if gate_mode == "calibrated" and (thresholds is None or thresholds.shape != (len(infos),)):
        shape = None if thresholds is None else thresholds.shape
        raise ValueError(
            f"gate mode 'calibrated' needs thresholds of shape ({len(infos)},), got {shape}"
        )
    x = xla_conv(x.astype(model.dtype), folded["stem"], 1 if model.stem == "cifar" else 2, True)
    if model.stem == "imagenet":
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    decisions, probs = [], []
    for i, (info, block) in enumerate(zip(infos, folded["blocks"], strict=True)):
        if "shortcut" in block:
            shortcut = xla_conv(x, block["shortcut"], info.strides, False)
        else:
            shortcut = x
        if not info.gated:
            ones = jnp.ones((x.shape[0],), jnp.float32)
            gate = GateOutput(ones, ones)
            y = _branch(x, block["branch"], info, xla_conv)
        else:
            threshold = 0.5 if thresholds is None else thresholds[i]
            gate = _gate(model, block["gate"], x, gate_mode, threshold)
            y = _skipping_branch(x, block["branch"], info, gate.decision, shortcut, path)
        x = nn.relu(shortcut + y)
        decisions.append(gate.decision)
        probs.append(gate.prob)
    x = jnp.mean(x, axis=(1, 2))
    linear = folded["linear"]
    logits = x @ linear["kernel"].astype(x.dtype) + linear["bias"].astype(x.dtype)
    return ModelOutput(logits.astype(jnp.float32), jnp.stack(decisions), jnp.stack(probs))


def _skipping_branch(
    x: jax.Array,
    convs: list[Folded],
    info: BlockInfo,
    decision: jax.Array,
    shortcut: jax.Array,
    path: str,
) -> jax.Array:
    """z · F(x) [B, H/s, W/s, C_out], with F computed only where it is needed."""
    if path == "pallas":

        def gated(x: jax.Array, folded: Folded, stride: int, relu: bool) -> jax.Array:
            _, h, w, c_in = x.shape
            h_out, w_out, c_out = -(-h // stride), -(-w // stride), folded["kernel"].shape[-1]
            whole = h_out * w_out * c_out <= WHOLE_IMAGE_TILE
            tiles = {} if whole else tile_sizes(h_out, w_out, c_in, c_out)
            return gated_conv(
                x,
                folded["kernel"],
                folded["scale"],
                folded["bias"],
                decision,
                stride=stride,
                relu=relu,
                **tiles,
            )

        return _branch(x, convs, info, gated)
    z = decision.astype(x.dtype)[:, None, None, None]
    return jax.lax.cond(
        jnp.any(decision > 0),
        lambda x: z * _branch(x, convs, info, xla_conv),
        lambda x: jnp.zeros_like(shortcut),
        x,
    )


#: Largest image side at which the Pallas kernel is used by "auto" on accelerators: it was
#: verified on an H100 at CIFAR sizes, while at ImageNet sizes one image per program is too big.
PALLAS_MAX_IMAGE = 32

#: Largest output (pixels × channels) computed as one whole-image tile, the largest verified on
#: an H100 (32×32×16, ResNet-110's first stage); larger layers are cut with
#: :func:`~aig_jax.kernels.gated_conv.tile_sizes`.
WHOLE_IMAGE_TILE = 32 * 32 * 16


def choose_path(per_device_batch: int, image_size: int) -> str:
    """The path "auto" takes: "cond" at batch 1 or on CPU (where Pallas only interprets),
    "pallas" on accelerators for images up to :data:`PALLAS_MAX_IMAGE`, else "masked"."""
    if per_device_batch == 1 or jax.default_backend() == "cpu":
        return "cond"
    return "pallas" if image_size <= PALLAS_MAX_IMAGE else "masked"


def make_fast_eval_step(
    model: ResNet, mesh: jax.sharding.Mesh, *, top_k: int = 5, path: str = "auto"
) -> EvalStep:
    """Drop-in :func:`aig_jax.steps.make_eval_step` whose time falls with the execution rate.

    Same call ``step(variables, batch, key, gate_mode, thresholds)`` and outputs (replicated).
    Each device runs :func:`skip_forward` on its share of the batch (``path`` "auto" picks
    with :func:`choose_path`; "masked" is the plain model); gate mode "sample" draws noise like
    the masked model, so it runs the masked model.
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
        folded = fold_variables(model, variables)

        def local(folded: Any, images: jax.Array, thresholds: jax.Array) -> tuple:
            return tuple(
                skip_forward(
                    model, folded, images, gate_mode=gate_mode, thresholds=thresholds, path=chosen
                )
            )

        # Each device skips for its own images: its cond predicate and kernel grid are local.
        per_block = jax.P(None, "data")
        parts = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(jax.P(), data, jax.P()),
            out_specs=(data, per_block, per_block),
            check_vma=False,
        )(folded, batch["image"], thresholds)
        return eval_outputs(ModelOutput(*parts), batch, top_k)

    return jax.jit(step, static_argnums=(3,), out_shardings=replicated(mesh))
