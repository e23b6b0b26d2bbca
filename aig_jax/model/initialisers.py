"""Initialisation schemes: the reference code's (``config.init = "reference"``) and He-normal.

The reference's CIFAR model keeps PyTorch 0.3.1's defaults everywhere but the gates' last
layer: convolution and linear weights and biases U(±1/√fan_in), BatchNorm γ ~ U(0, 1), β = 0.
Its ImageNet model re-draws every convolution He-normal over fan-out (the gates' first layer,
a 1×1 convolution there, included) and sets the BatchNorm2d γ to 1; the classifier, the gates'
first-layer bias and their BatchNorm1d γ keep PyTorch's defaults. ``"he_normal"`` (the
defaults of :class:`~aig_jax.model.resnet.ResNet`'s attributes, and what checkpoints whose
spec names no scheme were trained from) is He-normal over fan-out for the convolutions, γ = 1,
and Flax's defaults for the dense layers (LeCun-normal kernels, zero biases). In every scheme
the gates' last layer starts N(0, 0.001) with bias (0.1, 2) (see :mod:`aig_jax.model.gates`).
:func:`aig_jax.model.resnet.resnet` builds a model with a scheme's initialisers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

#: The schemes ``config.init`` chooses from.
INITS = ("reference", "he_normal")

Initializer = nn.initializers.Initializer

#: A bias initialiser given its layer's fan-in (PyTorch's default bias depends on it).
BiasInit = Callable[[int], Initializer]

#: He-normal over fan-out: N(0, 2 / (k·k·C_out)), the reference's ImageNet convolutions.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: PyTorch's default weights of convolutions and linear layers: U(±1/√fan_in).
torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

#: PyTorch 0.3.1's default BatchNorm γ: U(0, 1).
uniform_scale = nn.initializers.uniform(1.0)


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default bias of a layer with ``fan_in`` inputs: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def zero_bias(fan_in: int) -> Initializer:
    """Flax's default bias: zeros, whatever the fan-in."""
    del fan_in
    return nn.initializers.zeros


class DenseInit(NamedTuple):
    """Initialisers of a dense layer: its kernel [in, out] and its bias given ``in``."""

    kernel: Initializer
    bias: BiasInit


class Initialisers(NamedTuple):
    """What each kind of layer of a gated ResNet starts from under one scheme."""

    conv: Initializer  # convolution kernels [k, k, C_in, C_out]
    norm_scale: Initializer  # γ of the stem's and the blocks' BatchNorm
    head: DenseInit  # the classifier
    gate_fc1: DenseInit  # the gates' first layer [C_in, hidden]
    gate_norm_scale: Initializer | None  # γ of the gates' BatchNorm; None: the model norm's


HE_NORMAL = Initialisers(
    conv=he_normal,
    norm_scale=nn.initializers.ones,
    head=DenseInit(nn.initializers.lecun_normal(), zero_bias),
    gate_fc1=DenseInit(nn.initializers.lecun_normal(), zero_bias),
    gate_norm_scale=None,
)
REFERENCE_CIFAR = Initialisers(
    conv=torch_default,
    norm_scale=uniform_scale,
    head=DenseInit(torch_default, torch_default_bias),
    gate_fc1=DenseInit(torch_default, torch_default_bias),
    gate_norm_scale=None,
)
REFERENCE_IMAGENET = Initialisers(
    conv=he_normal,
    norm_scale=nn.initializers.ones,
    head=DenseInit(torch_default, torch_default_bias),
    gate_fc1=DenseInit(he_normal, torch_default_bias),
    gate_norm_scale=uniform_scale,
)


def initialisers(init: str, stem: str) -> Initialisers:
    """The scheme ``init`` (one of :data:`INITS`) for a model with a "cifar" or "imagenet" stem."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if init == "he_normal":
        return HE_NORMAL
    return REFERENCE_CIFAR if stem == "cifar" else REFERENCE_IMAGENET
