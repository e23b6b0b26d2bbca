"""Analytic parameters and multiply-accumulates (MACs) of gated ResNets.

The papers' "FLOPs" are multiply-adds, i.e. MACs. A block's cost splits into the residual
branch (skipped when the gate says 0), the shortcut projection and the gate (always executed).
The realised cost of an image is the fixed part plus the branches of the blocks it executed.
BatchNorm, ReLU, pooling and additions are not multiply-accumulates and are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aig_jax.model.blocks import ConvSpec
from aig_jax.model.resnet import ResNet


@dataclasses.dataclass(frozen=True)
class BlockCost:
    """Cost of one residual block for one image."""

    name: str
    gated: bool
    downsampling: bool
    input_hw: tuple[int, int]
    branch_macs: int
    shortcut_macs: int
    gate_macs: int
    branch_params: int
    shortcut_params: int
    gate_params: int

    @property
    def macs(self) -> int:
        """MACs when the block executes."""
        return self.branch_macs + self.shortcut_macs + self.gate_macs

    @property
    def params(self) -> int:
        """All trainable parameters of the block (BatchNorm scale and bias included)."""
        return self.branch_params + self.shortcut_params + self.gate_params


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-block costs plus the stem (first conv + BN) and head (linear layer)."""

    blocks: tuple[BlockCost, ...]
    stem_macs: int
    stem_params: int
    head_macs: int
    head_params: int

    @property
    def macs(self) -> int:
        """MACs per image with every block executed."""
        return self.stem_macs + self.head_macs + sum(b.macs for b in self.blocks)

    @property
    def params(self) -> int:
        """Trainable parameters of the whole model."""
        return self.stem_params + self.head_params + sum(b.params for b in self.blocks)

    @property
    def gate_params(self) -> int:
        """Parameters of all gates."""
        return sum(b.gate_params for b in self.blocks)

    @property
    def fixed_macs(self) -> int:
        """MACs spent whatever the gates decide: stem, head, shortcuts and gates."""
        return self.macs - int(sum(b.branch_macs for b in self.blocks))

    @property
    def branch_macs(self) -> np.ndarray:
        """[L] MACs of each block's residual branch."""
        return np.array([b.branch_macs for b in self.blocks], np.float64)

    def realised_macs(self, gates: jax.Array | np.ndarray) -> jax.Array:
        """MACs per image [B] given gate decisions [L, B] (ungated blocks report 1)."""
        gates = jnp.asarray(gates, jnp.float32)
        if gates.ndim != 2 or gates.shape[0] != len(self.blocks):
            raise ValueError(f"gates must be [{len(self.blocks)}, B], got {gates.shape}")
        branch = jnp.asarray(self.branch_macs, jnp.float32)
        return self.fixed_macs + jnp.einsum("l,lb->b", branch, gates)


def _conv_out(size: int, strides: int) -> int:
    # Every convolution and pooling here pads kernel // 2 on each side: out = ceil(in / s).
    return math.ceil(size / strides)


def _taps(size: int, kernel: int, strides: int, skip_padding: bool) -> int:
    """Kernel taps summed over the output positions of one spatial dimension."""
    out = _conv_out(size, strides)
    if not skip_padding:
        return out * kernel
    pad = kernel // 2
    return sum(1 for o in range(out) for t in range(kernel) if 0 <= o * strides - pad + t < size)


def _conv_cost(
    spec: ConvSpec, hw_in: tuple[int, int], skip_padding: bool
) -> tuple[int, int, tuple[int, int]]:
    """(MACs, params incl. the following BatchNorm, output size) of one conv spec."""
    if spec.groups < 1 or spec.in_features % spec.groups or spec.out_features % spec.groups:
        raise ValueError(
            f"convolution groups={spec.groups} must be positive and divide in_features="
            f"{spec.in_features} and out_features={spec.out_features}"
        )
    h, w = (_conv_out(d, spec.strides) for d in hw_in)
    taps = _taps(hw_in[0], spec.kernel, spec.strides, skip_padding)
    taps *= _taps(hw_in[1], spec.kernel, spec.strides, skip_padding)
    # Each output channel of a grouped convolution sees in_features / groups input channels.
    fan_in = spec.in_features // spec.groups
    weights = spec.kernel * spec.kernel * fan_in * spec.out_features
    return taps * fan_in * spec.out_features, weights + 2 * spec.out_features, (h, w)


def model_cost(
    model: nn.Module,
    image_size: int | Sequence[int] = 224,
    in_channels: int = 3,
    *,
    skip_padding: bool = False,
) -> ModelCost:
    """Analytic per-image cost of ``model`` on ``image_size`` (int or (H, W)) inputs.

    By convention (and in the papers) a k×k convolution costs k·k·C_in·C_out MACs per output
    position. ``skip_padding=True`` counts only the taps that fall inside the image, which is
    what XLA's ``cost_analysis()`` reports.
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"model_cost needs a ResNet (or subclass), got {type(model).__name__}")
    gate_cost = getattr(model.gate_cls(norm=model.norm), "cost", None)
    if gate_cost is None:
        raise TypeError(f"gate {model.gate_cls} has no cost(in_features) method")
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size}")
    hw = (int(hw[0]), int(hw[1]))
    stem_strides = 1 if model.stem == "cifar" else 2
    stem_kernel = 3 if model.stem == "cifar" else 7
    stem = ConvSpec(stem_kernel, in_channels, model.widths[0], stem_strides, "stem")
    stem_macs, stem_params, hw = _conv_cost(stem, hw, skip_padding)
    if model.stem == "imagenet":
        hw = (_conv_out(hw[0], 2), _conv_out(hw[1], 2))  # 3×3/2 max-pool
    blocks = []
    for info in model.block_infos():
        specs = info.block_cls.conv_specs(info.in_features, info.features, info.strides)
        cost = {"branch": [0, 0], "shortcut": [0, 0]}
        block_hw = hw
        for spec in specs:
            macs, params, out_hw = _conv_cost(
                spec, block_hw if spec.part == "shortcut" else hw, skip_padding
            )
            if spec.part == "branch":
                hw = out_hw
            cost[spec.part][0] += macs
            cost[spec.part][1] += params
        gate_macs, gate_params = gate_cost(info.in_features) if info.gated else (0, 0)
        blocks.append(
            BlockCost(
                name=info.name,
                gated=info.gated,
                downsampling=info.downsampling,
                input_hw=block_hw,
                branch_macs=cost["branch"][0],
                shortcut_macs=cost["shortcut"][0],
                gate_macs=gate_macs,
                branch_params=cost["branch"][1],
                shortcut_params=cost["shortcut"][1],
                gate_params=gate_params,
            )
        )
    last = model.block_infos()[-1].out_features
    head_macs = last * model.num_classes
    return ModelCost(
        tuple(blocks), stem_macs, stem_params, head_macs, head_macs + model.num_classes
    )
