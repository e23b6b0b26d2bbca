"""Gates that decide, per image, whether a residual block executes.

The gate of ConvNet-AIG looks at the block input, summarises it by global average pooling and
maps it through a tiny two-layer network to two logits: "skip" (index 0) and "execute"
(index 1). During training the decision is a hard sample drawn with the Gumbel-max trick, and
its gradient is the gradient of the relaxed (softmax) sample: the straight-through estimator.

Every gate, including those a fork registers, follows one contract, so that the residual
blocks never need editing::

    gate = GateClass(norm=norm, name="gate")
    out = gate(x, train=..., mode=..., threshold=...)   # x: [B, H, W, C]
    out.decision  # [B] float32, exactly 0.0 or 1.0 (1 = execute the block)
    out.prob      # [B] float32, noise-free p(execute)
    GateClass(norm=norm).cost(in_features)  # (MACs per image, parameters), for the cost model

``norm`` is the model's normalisation partial (see :class:`aig_jax.model.resnet.ResNet`); a
gate that normalises uses it, one that does not ignores it. In mode "sample" the gate draws its
own noise with ``self.make_rng("gumbel")``. Gate computations run in float32 whatever the
model's compute dtype, so bf16 training cannot flip decisions through rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

from aig_jax.errors import ConfigError
from aig_jax.model.initialisers import HE_NORMAL, DenseInit, Initializer
from aig_jax.registry import Registry

GateMode = Literal["sample", "argmax", "open", "calibrated"]
GATE_MODES: tuple[str, ...] = get_args(GateMode)

#: The Gumbel noise of the reference implementation: -log(eps - log(u + eps)).
GUMBEL_EPS = 1e-10


class GateOutput(NamedTuple):
    """What a gate returns: the hard decision and the noise-free execution probability."""

    decision: jax.Array  # [B] float32 in {0, 1}
    prob: jax.Array  # [B] float32 in [0, 1]


def check_gate_mode(mode: str) -> None:
    """Raise ``ValueError`` naming ``mode`` unless it is one of :data:`GATE_MODES`."""
    if mode not in GATE_MODES:
        raise ConfigError(f"unknown gate mode {mode!r}; expected one of {list(GATE_MODES)}")


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Gumbel(0, 1) noise of ``shape`` (float32), exactly as the reference code draws it."""
    u = jax.random.uniform(key, shape, jnp.float32)
    return -jnp.log(GUMBEL_EPS - jnp.log(u + GUMBEL_EPS))


def straight_through_gumbel(logits: jax.Array, noise: jax.Array, tau: float = 1.0) -> jax.Array:
    """Hard Gumbel-softmax sample with the straight-through gradient.

    Forward: the one-hot of ``argmax(logits + g)`` with Gumbel noise ``g``; values are exactly
    0 and 1. Backward: the gradient of ``softmax((logits + g) / tau)``.

    Args:
      logits: [..., K] unnormalised log-probabilities.
      noise: [..., K] standard Gumbel noise (:func:`gumbel_noise`).
      tau: softmax temperature of the relaxed sample (the gradient path only).

    Returns:
      [..., K] float32 one-hot samples.
    """
    perturbed = logits.astype(jnp.float32) + noise
    soft = jax.nn.softmax(perturbed / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(perturbed, axis=-1), logits.shape[-1], dtype=jnp.float32)
    # hard + (soft - soft) is exactly hard in the forward pass and carries soft's gradient.
    return hard + (soft - jax.lax.stop_gradient(soft))


def straight_through_threshold(prob: jax.Array, threshold: jax.Array | float) -> jax.Array:
    """Deterministic decision ``prob > threshold`` (exactly 0/1) with the gradient of ``prob``.

    Args:
      prob: [B] execution probabilities.
      threshold: scalar threshold (0.5 is the argmax decision of a two-way gate).

    Returns:
      [B] float32 decisions.
    """
    hard = (prob > threshold).astype(jnp.float32)
    return hard + (prob - jax.lax.stop_gradient(prob))


def decide(
    logits: jax.Array,
    mode: str,
    *,
    tau: float,
    threshold: jax.Array | float,
    noise: jax.Array | None = None,
) -> GateOutput:
    """Turn two-way gate logits [B, 2] into a :class:`GateOutput` according to ``mode``.

    ``sample`` draws a hard straight-through Gumbel sample with the Gumbel ``noise`` [B, 2]
    (required then); ``argmax`` thresholds p(execute) at 0.5;
    ``calibrated`` thresholds it at ``threshold``; ``open`` executes every image.
    Deterministic modes pass the gradient of p(execute) straight through, so attacks can
    differentiate through them.
    """
    check_gate_mode(mode)
    logits = logits.astype(jnp.float32)
    # p(execute) = softmax(logits)[1] is the probability that a hard Gumbel sample executes at
    # any temperature (τ only shapes the straight-through gradient).
    prob = jax.nn.softmax(logits, axis=-1)[:, 1]
    if mode == "sample":
        if noise is None:
            raise ValueError("gate mode 'sample' needs Gumbel noise of shape [B, 2]")
        decision = straight_through_gumbel(logits, noise, tau)[:, 1]
    elif mode == "argmax":
        decision = straight_through_threshold(prob, 0.5)
    elif mode == "calibrated":
        decision = straight_through_threshold(prob, threshold)
    else:  # open
        decision = jnp.ones_like(prob)
    return GateOutput(decision, prob)


def _fc2_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return 0.001 * jax.random.normal(key, shape, dtype)


def _fc2_bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    if shape != (2,):
        raise ValueError(f"the gate's last layer must have 2 outputs, got bias shape {shape}")
    # p(execute) = sigmoid(2.0 - 0.1) ~ 0.87 at initialisation, as in the reference.
    return jnp.array([0.1, 2.0], dtype)


class GumbelGate(nn.Module):
    """The ConvNet-AIG gate: avg-pool → Dense(hidden) → norm → ReLU → Dense(2) → decision.

    Attributes:
      norm: the model's normalisation partial; the gate applies it in float32 to [B, hidden].
      hidden: width of the hidden layer (16 in the paper).
      tau: Gumbel-softmax temperature (1 in the paper).
      fc1_init: initialisers of the first layer (see :mod:`aig_jax.model.initialisers`).
      norm_scale_init: initialiser of the norm's scale; None keeps the ``norm`` partial's.
    """

    norm: Callable[..., nn.Module]
    hidden: int = 16
    tau: float = 1.0
    fc1_init: DenseInit = HE_NORMAL.gate_fc1
    norm_scale_init: Initializer | None = None

    def cost(self, in_features: int) -> tuple[int, int]:
        """(multiply-accumulates per image, parameters) of a gate on ``in_features`` channels.

        Part of the gate contract: :mod:`aig_jax.model.flops` asks an unbound gate for its
        cost. The pooling's additions are not multiply-accumulates and are not counted.
        """
        hidden = self.hidden
        macs = in_features * hidden + hidden * 2
        params = (in_features * hidden + hidden) + 2 * hidden + (hidden * 2 + 2)
        return macs, params

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool, mode: str, threshold: jax.Array | float = 0.5
    ) -> GateOutput:
        """Decide for each image of ``x`` [B, H, W, C]; returns decisions and probs, each [B].

        ``train`` is carried by ``norm`` here (batch or running statistics); it is part of the
        contract for gates whose own layers behave differently in training.
        """
        del train
        w = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        w = nn.Dense(
            self.hidden,
            dtype=jnp.float32,
            kernel_init=self.fc1_init.kernel,
            bias_init=self.fc1_init.bias(x.shape[-1]),
            name="fc1",
        )(w)
        scale = {} if self.norm_scale_init is None else {"scale_init": self.norm_scale_init}
        w = nn.relu(self.norm(dtype=jnp.float32, name="fc1bn", **scale)(w))
        logits = nn.Dense(
            2,
            dtype=jnp.float32,
            kernel_init=_fc2_kernel_init,
            bias_init=_fc2_bias_init,
            name="fc2",
        )(w)
        noise = gumbel_noise(self.make_rng("gumbel"), logits.shape) if mode == "sample" else None
        return decide(logits, mode, tau=self.tau, threshold=threshold, noise=noise)


#: Gates by name: ``config.gate`` picks one; forks add theirs with ``GATES.register``.
GATES: Registry[Callable[..., nn.Module]] = Registry("gate")
GATES.register("gumbel", GumbelGate)
