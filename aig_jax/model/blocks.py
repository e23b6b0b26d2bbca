"""Gated residual blocks with the masked residual ``relu(shortcut(x) + z · F(x))``.

The residual branch F is computed for every image and multiplied by the gate decision z, so
shapes are static and the same code runs jit-compiled on any device mesh. As in the reference,
the branch's BatchNorm statistics include images whose gate is 0.

A block is given the model's ``conv`` and ``norm`` partials (as in the Flax ImageNet example)
and exposes its parts as methods: :meth:`ResidualBlock.branch` (F), ``shortcut`` and the gate.
How the gated branch is combined with its decision is a function of the call
(:func:`masked_branch` by default), so :mod:`aig_jax.inference` can run the same modules under
``lax.cond`` or with a kernel that skips images, without a second copy of the forward pass.

Each block class also declares its convolutions (:meth:`ResidualBlock.conv_specs`), from which
:mod:`aig_jax.model.flops` derives parameters and multiply-accumulates without tracing the
model. A fork adds a new block by subclassing :class:`ResidualBlock` and implementing
``branch``, ``conv_specs`` and, if its output is wider, ``expansion``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from aig_jax.model.gates import GateOutput, GumbelGate
from aig_jax.model.initialisers import Initializer, he_normal

#: A module class, or a ``functools.partial`` of one (the Flax ImageNet example's ``ModuleDef``).
ModuleDef = Callable[..., nn.Module]

#: The model's convolution: bias-free, He-normal over fan-out (the model's initialisation
#: scheme may bind another ``kernel_init``). Blocks pass features, kernel size, strides and
#: PyTorch's padding (kernel // 2 on each side).
Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=he_normal)


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm over the last axis of x [..., C], as the reference trains it.

    Training normalises with the batch's mean and biased variance and updates the running
    statistics with the *unbiased* variance (×n/(n-1), n values per feature), as PyTorch does
    and Flax's ``nn.BatchNorm`` does not; evaluation normalises with the running statistics.
    Statistics are reduced in float32; the output has ``dtype`` (default: x's, at least
    float32). Variables: params ``scale``, ``bias``; batch_stats ``mean``, ``var``.

    Attributes:
      use_running_average: normalise with the running statistics (evaluation).
      momentum: weight of the old running statistics, Flax's convention (PyTorch's 0.1).
      epsilon: added to the variance.
      dtype: output dtype.
      scale_init: initialiser of γ; bias_init: of β.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise x [..., C] per feature; same shape."""
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axes) - jnp.square(mean))
            if not self.is_initializing():
                n = x.size // features
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype or jnp.promote_types(x.dtype, jnp.float32))


class ConvSpec(NamedTuple):
    """One convolution of a block (each is followed by a BatchNorm): what the cost model needs."""

    kernel: int
    in_features: int
    out_features: int
    strides: int
    part: str  # "branch" (skipped with the block) or "shortcut" (always executed)
    groups: int = 1  # grouped convolution (ResNeXt): each output sees in_features / groups


#: ``gated_branch(block, x, decision) -> z · F(x)``: how a gated block combines its branch with
#: its decisions [B]; x [B, H, W, C_in] → [B, H/s, W/s, C_out].
GatedBranch = Callable[["ResidualBlock", jax.Array, jax.Array], jax.Array]


def masked_branch(block: ResidualBlock, x: jax.Array, decision: jax.Array) -> jax.Array:
    """``z · F(x)``: the branch of every image, multiplied by its decision (static shapes)."""
    y = block.branch(x)
    return decision.astype(y.dtype)[:, None, None, None] * y


class ResidualBlock(nn.Module):
    """Base of gated residual blocks: gate, projection shortcut and masked residual.

    Attributes:
      features: the block's width (bottleneck width for bottleneck blocks).
      conv: the model's convolution partial (dtype bound).
      norm: the model's normalisation partial (dtype and train/eval statistics bound).
      strides: spatial stride of the block.
      gated: whether the block has a gate; an ungated block always executes.
      gate_cls: the gate module class, or a ``functools.partial`` of one with options (see
        :mod:`aig_jax.model.gates` for the contract).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    gated: bool = True
    gate_cls: ModuleDef = GumbelGate

    expansion: ClassVar[int] = 1

    @classmethod
    def out_features_of(cls, features: int) -> int:
        """Output width of a block of width ``features``."""
        return features * cls.expansion

    @classmethod
    def conv_specs(cls, in_features: int, features: int, strides: int) -> tuple[ConvSpec, ...]:
        """The block's convolutions in order: branch first, then the projection if any."""
        raise NotImplementedError

    @classmethod
    def needs_projection(cls, in_features: int, features: int, strides: int) -> bool:
        """Whether the shortcut is a 1×1 convolution + BatchNorm rather than the identity."""
        return strides != 1 or in_features != cls.out_features_of(features)

    @classmethod
    def projection_spec(cls, in_features: int, features: int, strides: int) -> tuple[ConvSpec, ...]:
        """The shortcut's convolution, if the block needs one."""
        if not cls.needs_projection(in_features, features, strides):
            return ()
        return (ConvSpec(1, in_features, cls.out_features_of(features), strides, "shortcut"),)

    def branch(self, x: jax.Array) -> jax.Array:
        """The residual branch F(x): [B, H, W, C_in] → [B, H/s, W/s, C_out]."""
        raise NotImplementedError

    def shortcut(self, x: jax.Array) -> jax.Array:
        """The identity, or a 1×1 convolution + norm where width or resolution change."""
        if not self.needs_projection(x.shape[-1], self.features, self.strides):
            return x
        out_features = self.out_features_of(self.features)
        y = self.conv(out_features, (1, 1), self.strides, name="shortcut_conv")(x)
        return self.norm(name="shortcut_bn")(y)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        gate_mode: str,
        threshold: jax.Array | float = 0.5,
        gated_branch: GatedBranch = masked_branch,
    ) -> tuple[jax.Array, GateOutput]:
        """Apply the block to ``x`` [B, H, W, C_in].

        Returns the output [B, H/s, W/s, C_out] and the gate's decision and p(execute), each
        [B]; an ungated block reports 1 for both.
        """
        if not self.gated:
            # ones_like keeps the batch's sharding, so the [L, B] stack of decisions agrees
            # across gated and ungated blocks under an explicit ('data',) mesh.
            ones = jnp.ones_like(x[:, 0, 0, 0], jnp.float32)
            return nn.relu(self.shortcut(x) + self.branch(x)), GateOutput(ones, ones)
        gate = self.gate_cls(norm=self.norm, name="gate")(
            x, train=train, mode=gate_mode, threshold=threshold
        )
        y = gated_branch(self, x, gate.decision)
        return nn.relu(self.shortcut(x) + y), gate


class BasicBlock(ResidualBlock):
    """Two 3×3 convolutions (ResNet-18/34 and the CIFAR ResNets)."""

    expansion: ClassVar[int] = 1

    @classmethod
    def conv_specs(cls, in_features: int, features: int, strides: int) -> tuple[ConvSpec, ...]:
        """conv1 3×3/s, conv2 3×3, then the projection."""
        return (
            ConvSpec(3, in_features, features, strides, "branch"),
            ConvSpec(3, features, features, 1, "branch"),
            *cls.projection_spec(in_features, features, strides),
        )

    def branch(self, x: jax.Array) -> jax.Array:
        """conv3×3/s → norm → ReLU → conv3×3 → norm."""
        y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=1, name="conv2")(y)
        return self.norm(name="bn2")(y)


class Bottleneck(ResidualBlock):
    """1×1 → 3×3 (strided, ResNet v1.5 as in the reference) → 1×1 with expansion 4."""

    expansion: ClassVar[int] = 4

    @classmethod
    def conv_specs(cls, in_features: int, features: int, strides: int) -> tuple[ConvSpec, ...]:
        """conv1 1×1, conv2 3×3/s, conv3 1×1 (×4 wide), then the projection."""
        return (
            ConvSpec(1, in_features, features, 1, "branch"),
            ConvSpec(3, features, features, strides, "branch"),
            ConvSpec(1, features, features * cls.expansion, 1, "branch"),
            *cls.projection_spec(in_features, features, strides),
        )

    def branch(self, x: jax.Array) -> jax.Array:
        """conv1×1 → norm → ReLU → conv3×3/s → norm → ReLU → conv1×1 → norm."""
        y = self.conv(self.features, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features * self.expansion, (1, 1), name="conv3")(y)
        return self.norm(name="bn3")(y)
