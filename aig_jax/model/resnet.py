"""Gated ResNets (CIFAR and ImageNet families) and the model registry.

``build_model("resnet110_cifar", gated=...)`` returns a :class:`ResNet`, its layers initialised
by the scheme ``init`` (the reference's by default); calling it returns a :class:`ModelOutput`
with the logits and the gate decisions of every residual block ([L, B]). Static per-block
metadata comes from :meth:`ResNet.block_infos` without initialising anything.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from aig_jax.model.blocks import (
    BasicBlock,
    BatchNorm,
    Bottleneck,
    Conv,
    GatedBranch,
    ModuleDef,
    ResidualBlock,
    masked_branch,
)
from aig_jax.model.gates import GATES, GumbelGate, check_gate_mode
from aig_jax.model.initialisers import HE_NORMAL, DenseInit, initialisers
from aig_jax.registry import Registry

CIFAR_WIDTHS = (16, 32, 64)
IMAGENET_WIDTHS = (64, 128, 256, 512)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ModelOutput(NamedTuple):
    """What a model returns: logits [B, K] (float32), decisions [L, B], p(execute) [L, B]."""

    logits: jax.Array
    gates: jax.Array
    probs: jax.Array


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """Static description of one residual block."""

    name: str  # e.g. "stage2_block0"
    stage: int  # 1-based, like the reference's layer1..layer4
    index: int  # position within the stage
    in_features: int
    features: int
    out_features: int
    strides: int
    gated: bool
    block_cls: type[ResidualBlock]

    @property
    def downsampling(self) -> bool:
        """True for blocks that change resolution or width (projection shortcut)."""
        return self.block_cls.needs_projection(self.in_features, self.features, self.strides)


class ResNet(nn.Module):
    """A ResNet whose residual blocks may each carry a gate.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block_cls: :class:`BasicBlock`, :class:`Bottleneck` or a fork's block.
      widths: block width of each stage.
      stem: "cifar" (3×3 conv) or "imagenet" (7×7/2 conv + 3×3/2 max-pool).
      num_classes: number of output logits.
      gated: one flag per block, or one bool for all blocks.
      gate_cls: the gate module class.
      dtype: compute dtype; parameters, gates and logits stay float32.
      conv: the convolution class, called as ``conv(features, kernel_size, strides,
        padding=..., name=...)`` with ``dtype`` bound.
      norm: the normalisation class, called as ``norm(name=...)`` with
        ``use_running_average`` and ``dtype`` bound (the gates override ``dtype``): e.g.
        :data:`~aig_jax.model.blocks.BatchNorm` with another ``scale_init``, or a GroupNorm
        wrapper that ignores ``use_running_average``.
      head_init: initialisers of the classifier (see :mod:`aig_jax.model.initialisers`).

    The defaults of ``conv``, ``norm``, ``head_init`` and the gate's are the "he_normal"
    scheme's; :func:`resnet` builds a ResNet with the scheme it is given.
    """

    stage_sizes: Sequence[int]
    block_cls: type[ResidualBlock]
    widths: Sequence[int]
    stem: str
    num_classes: int
    gated: bool | tuple[bool, ...] = True
    gate_cls: ModuleDef = GumbelGate
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    head_init: DenseInit = HE_NORMAL.head

    @property
    def num_blocks(self) -> int:
        """Number of residual blocks L."""
        return int(sum(self.stage_sizes))

    def gated_flags(self) -> tuple[bool, ...]:
        """One bool per block; raises ``ValueError`` if ``gated`` has the wrong length."""
        if isinstance(self.gated, bool):
            return (self.gated,) * self.num_blocks
        flags = tuple(bool(g) for g in self.gated)
        if len(flags) != self.num_blocks:
            raise ValueError(
                f"gated has {len(flags)} entries but the model has {self.num_blocks} blocks"
            )
        return flags

    def block_infos(self) -> tuple[BlockInfo, ...]:
        """Static metadata of every residual block, in execution order."""
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {self.stem!r}; expected 'cifar' or 'imagenet'")
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError(f"{len(self.widths)} widths given for {len(self.stage_sizes)} stages")
        flags = self.gated_flags()
        infos: list[BlockInfo] = []
        in_features = self.widths[0]
        for s, (size, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for b in range(size):
                strides = 2 if (s > 0 and b == 0) else 1
                out_features = self.block_cls.out_features_of(width)
                infos.append(
                    BlockInfo(
                        name=f"stage{s + 1}_block{b}",
                        stage=s + 1,
                        index=b,
                        in_features=in_features,
                        features=width,
                        out_features=out_features,
                        strides=strides,
                        gated=flags[len(infos)],
                        block_cls=self.block_cls,
                    )
                )
                in_features = out_features
        return tuple(infos)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        gate_mode: str | None = None,
        thresholds: jax.Array | None = None,
        gated_branch: GatedBranch = masked_branch,
    ) -> ModelOutput:
        """Classify ``x`` [B, H, W, C] (normalised images).

        Args:
          train: normalise with batch statistics (and update ``batch_stats``) when True.
          gate_mode: "sample" (default when training; each gate draws Gumbel noise from the
            ``gumbel`` rng), "argmax" (default otherwise), "open" (every block executes) or
            "calibrated".
          thresholds: [L] thresholds on p(execute), required by "calibrated".
          gated_branch: how gated blocks apply their branch (see
            :func:`aig_jax.model.blocks.masked_branch`).

        Returns:
          ModelOutput(logits [B, num_classes], gates [L, B], probs [L, B]).
        """
        if x.ndim != 4:
            raise ValueError(f"expected images of shape [B, H, W, C], got shape {x.shape}")
        mode = gate_mode or ("sample" if train else "argmax")
        check_gate_mode(mode)
        infos = self.block_infos()
        if mode == "calibrated" and (thresholds is None or thresholds.shape != (len(infos),)):
            shape = None if thresholds is None else thresholds.shape
            raise ValueError(
                f"gate mode 'calibrated' needs thresholds of shape ({len(infos)},), got {shape}"
            )
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
        x = x.astype(self.dtype)
        if self.stem == "cifar":
            x = conv(self.widths[0], (3, 3), padding=1, name="conv1")(x)
        else:
            x = conv(self.widths[0], (7, 7), 2, padding=3, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        decisions, probs = [], []
        for i, info in enumerate(infos):
            block = self.block_cls(
                info.features,
                conv=conv,
                norm=norm,
                strides=info.strides,
                gated=info.gated,
                gate_cls=self.gate_cls,
                name=info.name,
            )
            x, gate = block(
                x,
                train=train,
                gate_mode=mode,
                threshold=0.5 if thresholds is None else thresholds[i],
                gated_branch=gated_branch,
            )
            decisions.append(gate.decision)
            probs.append(gate.prob)
        x = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=self.head_init.kernel,
            bias_init=self.head_init.bias(x.shape[-1]),
            name="linear",
        )(x)
        return ModelOutput(logits.astype(jnp.float32), jnp.stack(decisions), jnp.stack(probs))


def _takes(module: ModuleDef, name: str) -> bool:
    """Whether the module class (or partial of one) ``module`` has the attribute ``name``."""
    return name in inspect.signature(module).parameters


def resnet(
    *,
    stem: str,
    init: str = "reference",
    gate_cls: ModuleDef = GumbelGate,
    **attributes: Any,
) -> ResNet:
    """A :class:`ResNet` (``stem`` and ``attributes`` are its attributes) whose layers start
    from the initialisation scheme ``init`` (one of :data:`~aig_jax.model.initialisers.INITS`;
    "reference" is the reference code's for the ``stem``'s family).

    The scheme gives the ``conv`` and ``norm`` partials, the classifier's initialisers and,
    for a gate that has ``fc1_init`` and ``norm_scale_init`` attributes (:class:`GumbelGate`),
    the gate's; another gate keeps its own.
    """
    scheme = initialisers(init, stem)
    if _takes(gate_cls, "fc1_init") and _takes(gate_cls, "norm_scale_init"):
        gate_cls = functools.partial(
            gate_cls, fc1_init=scheme.gate_fc1, norm_scale_init=scheme.gate_norm_scale
        )
    return ResNet(
        stem=stem,
        conv=functools.partial(Conv, kernel_init=scheme.conv),
        norm=functools.partial(BatchNorm, scale_init=scheme.norm_scale),
        head_init=scheme.head,
        gate_cls=gate_cls,
        **attributes,
    )


ModelFactory = Callable[..., nn.Module]

#: Backbones by name. A factory takes ``num_classes``, ``gated``, ``gate_cls``, ``dtype`` and
#: ``init`` keywords and returns a module with ``block_infos()`` whose call returns a
#: ModelOutput; ``functools.partial(resnet, stage_sizes=..., block_cls=..., widths=...,
#: stem=...)`` is one.
MODELS: Registry[ModelFactory] = Registry("model")

#: Default number of classes of each registered name (the dataset it is usually trained on).
DEFAULT_NUM_CLASSES: dict[str, int] = {}


def cifar_resnet(depth: int, **kwargs: Any) -> ResNet:
    """A CIFAR ResNet of ``depth`` = 6n + 2 (three stages of n basic blocks, widths 16/32/64)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    kwargs.setdefault("num_classes", 10)
    return resnet(
        stage_sizes=(n, n, n), block_cls=BasicBlock, widths=CIFAR_WIDTHS, stem="cifar", **kwargs
    )


def _register(name: str, factory: ModelFactory, num_classes: int) -> None:
    MODELS.register(name, factory)
    DEFAULT_NUM_CLASSES[name] = num_classes


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}_cifar", functools.partial(cifar_resnet, _depth), 10)

for _depth, _block, _sizes in (
    (18, BasicBlock, (2, 2, 2, 2)),
    (34, BasicBlock, (3, 4, 6, 3)),
    (50, Bottleneck, (3, 4, 6, 3)),
    (101, Bottleneck, (3, 4, 23, 3)),
    (152, Bottleneck, (3, 8, 36, 3)),
):
    _register(
        f"resnet{_depth}",
        functools.partial(
            resnet,
            stage_sizes=_sizes,
            block_cls=_block,
            widths=IMAGENET_WIDTHS,
            stem="imagenet",
        ),
        1000,
    )


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    gated: bool | Sequence[bool] = True,
    gate: str = "gumbel",
    gate_options: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    init: str = "reference",
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
      name: a registry name, e.g. "resnet110_cifar" or "resnet50" (see ``MODELS.names()``).
      num_classes: defaults to the model's usual dataset (10 for CIFAR names, 1000 otherwise).
      gated: True/False for every block, or one flag per block (``rates < 1`` of a schedule).
      gate: a name from :data:`aig_jax.model.gates.GATES`.
      gate_options: keyword arguments of the gate class, e.g. ``{"tau": 1.0}``.
      dtype: "float32" or "bfloat16" compute (parameters stay float32).
      init: the initialisation scheme, "reference" (the reference code's) or "he_normal" (see
        :mod:`aig_jax.model.initialisers` and :func:`resnet`).

    Other normalisations or convolutions: ``build_model(...).clone(norm=...)`` (see
    :class:`ResNet`).
    """
    factory = MODELS.get(name)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if num_classes is None:
        num_classes = DEFAULT_NUM_CLASSES.get(name, 1000)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    flags = gated if isinstance(gated, bool) else tuple(bool(g) for g in gated)
    gate_cls = GATES.get(gate)
    if gate_options:
        gate_cls = functools.partial(gate_cls, **gate_options)
    model = factory(
        num_classes=num_classes, gated=flags, gate_cls=gate_cls, dtype=DTYPES[dtype], init=init
    )
    model.block_infos()  # validates the gated flags against the depth now, not at first call
    return model


def num_blocks(name: str) -> int:
    """Number of residual blocks of the registered model ``name``."""
    return len(MODELS.get(name)(num_classes=1, gated=False).block_infos())
