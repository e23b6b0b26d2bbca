"""Gated residual blocks with the masked residual ``relu(shortcut(x) + z * F(x))``.

The residual branch F is computed for every image and multiplied by the gate decision z, so
shapes are static and the same code runs jit-compiled on any device mesh. As in the reference,
the branch's BatchNorm statistics include images whose gate is 0.

Each block class also declares its convolutions (:meth:`conv_specs`), from which
:mod:`aig_jax.flops` derives parameters and multiply-accumulates without tracing the model.
A fork adds a new block by subclassing :class:`ResidualBlock` and implementing ``branch``,
``conv_specs`` and ``out_features``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from aig_jax.batch_norm import BatchNorm
from aig_jax.gates import GateOutput, GumbelGate

#: He-normal initialisation over fan-out, as the reference initialises its convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: BatchNorm epsilon of every convolution's BatchNorm (PyTorch's default).
BN_EPSILON = 1e-5


class ConvSpec(NamedTuple):
    """One convolution of a block (each is followed by a BatchNorm): what the cost model needs."""

    kernel: int
    in_features: int
    out_features: int
    strides: int
    part: str  # "branch" (skipped with the block) or "shortcut" (always executed)
    groups: int = 1  # grouped convolution (ResNeXt): each output sees in_features / groups


def conv(
    features: int, kernel: int, strides: int, name: str, dtype: Any, groups: int = 1
) -> nn.Conv:
    """A bias-free square convolution padded like PyTorch's ``padding=kernel // 2``.

    ``groups`` > 1 splits input and output channels into that many independent groups.
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        kernel_init=conv_kernel_init,
        name=name,
    )


def batch_norm(train: bool, name: str, dtype: Any) -> BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 in PyTorch's convention, eps 1e-5)."""
    return BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=BN_EPSILON, dtype=dtype, name=name
    )


class ResidualBlock(nn.Module):
    """Base of gated residual blocks: gate, projection shortcut and masked residual.

    Attributes:
      features: the block's width (bottleneck width for bottleneck blocks).
      strides: spatial stride of the block.
      gated: whether the block has a gate; an ungated block always executes.
      gate_cls: the gate module class, or a ``functools.partial`` of one with options (see
        :mod:`aig_jax.gates` for the contract).
      dtype: compute dtype of convolutions and BatchNorms (parameters stay float32).
    """

    features: int
    strides: int = 1
    gated: bool = True
    gate_cls: Callable[..., nn.Module] = GumbelGate
    dtype: Any = jnp.float32

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

    def branch(self, x: jax.Array, train: bool) -> jax.Array:
        """The residual branch F(x): [B, H, W, C_in] → [B, H/s, W/s, C_out]."""
        raise NotImplementedError

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        gate_mode: str,
        threshold: jax.Array | float = 0.5,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, GateOutput]:
        """Apply the block to ``x`` [B, H, W, C_in]; ``noise`` is the gate's Gumbel noise
        [B, 2] in gate mode "sample" (see :mod:`aig_jax.gates`).

        Returns the output [B, H/s, W/s, C_out] and the gate's decision and p(execute), each
        [B]; an ungated block reports 1 for both.
        """
        if self.gated:
            gate = self.gate_cls(name="gate")(
                x, train=train, mode=gate_mode, threshold=threshold, noise=noise
            )
        else:
            # ones_like keeps the batch's sharding, so the [L, B] stack of decisions agrees
            # across gated and ungated blocks under an explicit ('data',) mesh.
            ones = jnp.ones_like(x[:, 0, 0, 0], jnp.float32)
            gate = GateOutput(ones, ones)
        y = self.branch(x, train)
        out_features = self.out_features_of(self.features)
        if self.needs_projection(x.shape[-1], self.features, self.strides):
            shortcut = conv(out_features, 1, self.strides, "shortcut_conv", self.dtype)(x)
            shortcut = batch_norm(train, "shortcut_bn", self.dtype)(shortcut)
        else:
            shortcut = x
        z = gate.decision.astype(y.dtype)[:, None, None, None]
        return nn.relu(shortcut + z * y), gate


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

    def branch(self, x: jax.Array, train: bool) -> jax.Array:
        """conv3×3/s → BN → ReLU → conv3×3 → BN."""
        bn = functools.partial(batch_norm, train, dtype=self.dtype)
        y = conv(self.features, 3, self.strides, "conv1", self.dtype)(x)
        y = nn.relu(bn("bn1")(y))
        y = conv(self.features, 3, 1, "conv2", self.dtype)(y)
        return bn("bn2")(y)


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

    def branch(self, x: jax.Array, train: bool) -> jax.Array:
        """conv1×1 → BN → ReLU → conv3×3/s → BN → ReLU → conv1×1 → BN."""
        bn = functools.partial(batch_norm, train, dtype=self.dtype)
        y = conv(self.features, 1, 1, "conv1", self.dtype)(x)
        y = nn.relu(bn("bn1")(y))
        y = conv(self.features, 3, self.strides, "conv2", self.dtype)(y)
        y = nn.relu(bn("bn2")(y))
        y = conv(self.features * self.expansion, 1, 1, "conv3", self.dtype)(y)
        return bn("bn3")(y)
