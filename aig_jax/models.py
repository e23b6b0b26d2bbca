"""Gated ResNets (CIFAR and ImageNet families) and the model registry.

``build_model("resnet110_cifar", gated=...)`` returns a :class:`ResNet`; calling it returns a
:class:`ModelOutput` with the logits and the gate decisions of every residual block ([L, B]).
Static per-block metadata comes from :meth:`ResNet.block_infos` without initialising anything.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from aig_jax.blocks import BasicBlock, Bottleneck, ResidualBlock, batch_norm, conv
from aig_jax.gates import GATES, GateOutput, GumbelGate, check_gate_mode, gumbel_noise
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
      scan_blocks: apply each run of identical blocks (a stage's blocks after its first, with
        the same gated flag) as one ``lax.scan`` over their stacked variables, so XLA compiles
        one block body per run instead of one per block. Parameters keep the per-block layout
        (checkpoints are interchangeable); outputs equal the unrolled model's, sampled gates
        included.
    """

    stage_sizes: Sequence[int]
    block_cls: type[ResidualBlock]
    widths: Sequence[int]
    stem: str
    num_classes: int
    gated: bool | tuple[bool, ...] = True
    gate_cls: Callable[..., nn.Module] = GumbelGate
    dtype: Any = jnp.float32
    scan_blocks: bool = False

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
    ) -> ModelOutput:
        """Classify ``x`` [B, H, W, C] (normalised images).

        Args:
          train: BatchNorm uses batch statistics (and updates ``batch_stats``) when True.
          gate_mode: "sample" (default when training; draws the Gumbel noise of every gate
            at once from the ``gumbel`` rng), "argmax" (default otherwise), "open" (every block
            executes) or "calibrated".
          thresholds: [L] thresholds on p(execute), required by "calibrated".

        Returns:
          ModelOutput(logits [B, num_classes], gates [L, B], probs [L, B]).
        """
        if x.ndim != 4:
            raise ValueError(f"expected images of shape [B, H, W, C], got shape {x.shape}")
        mode = gate_mode or ("sample" if train else "argmax")
        check_gate_mode(mode)
        infos = self.block_infos()
        if mode == "calibrated":
            if thresholds is None or jnp.shape(thresholds) != (len(infos),):
                raise ValueError(
                    f"gate mode 'calibrated' needs thresholds of shape ({len(infos)},), got "
                    f"{None if thresholds is None else jnp.shape(thresholds)}"
                )
        x = x.astype(self.dtype)
        if self.stem == "cifar":
            x = conv(self.widths[0], 3, 1, "conv1", self.dtype)(x)
            x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
        else:
            x = conv(self.widths[0], 7, 2, "conv1", self.dtype)(x)
            x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        limits = jnp.full((len(infos),), 0.5) if thresholds is None else jnp.asarray(thresholds)
        # The Gumbel noise of every gate in one draw, [L, B, 2]: drawn gate by gate, each draw
        # derives its own key and generates its own bits, code that XLA compiles once per gate.
        noise = None
        if mode == "sample" and any(info.gated for info in infos):
            noise = gumbel_noise(self.make_rng("gumbel"), (len(infos), x.shape[0], 2))
        # Each block reads its noise and threshold, and writes its decision and p(execute),
        # at an index XLA cannot see: with constant indices every gate's kernels would differ
        # in a slice offset, and XLA would compile them once per gate instead of once.
        index = jax.lax.optimization_barrier(tuple(jnp.int32(i) for i in range(len(infos))))
        decisions, probs, starts = [], [], []
        scan = self.scan_blocks and not self.is_initializing()
        for run in _runs(infos) if scan else [[i] for i in range(len(infos))]:
            start, n = index[run[0]], len(run)
            starts.append(start)
            run_limits = jax.lax.dynamic_slice_in_dim(limits, start, n)
            run_noise = None if noise is None else jax.lax.dynamic_slice_in_dim(noise, start, n)
            if n == 1:
                info = infos[run[0]]
                block = self._block(info, name=info.name)
                x, gate = block(
                    x,
                    train=train,
                    gate_mode=mode,
                    threshold=run_limits[0],
                    noise=None if run_noise is None else run_noise[0],
                )
                gate = GateOutput(gate.decision[None], gate.prob[None])
            else:
                x, gate = self._scan([infos[i] for i in run], x, train, mode, run_limits, run_noise)
            decisions.append(gate.decision)
            probs.append(gate.prob)
        x = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)
        return ModelOutput(
            logits.astype(jnp.float32), stack_rows(decisions, starts), stack_rows(probs, starts)
        )

    def _block(self, info: BlockInfo, name: str | None = None) -> ResidualBlock:
        return self.block_cls(
            info.features,
            strides=info.strides,
            gated=info.gated,
            gate_cls=self.gate_cls,
            dtype=self.dtype,
            name=name,
        )

    def _scan(
        self,
        run: Sequence[BlockInfo],
        x: jax.Array,
        train: bool,
        mode: str,
        thresholds: jax.Array,
        noise: jax.Array | None,
    ) -> tuple[jax.Array, GateOutput]:
        """Apply the identical blocks ``run`` in order with one ``lax.scan``.

        Each block's variables are read from its own subtree, stacked along a new leading axis
        of length n = len(run), and the updated BatchNorm statistics are written back to the
        same subtrees; block i gets ``thresholds[i]`` and, in mode "sample", the Gumbel noise
        ``noise[i]`` ([n, B, 2]). ``x`` [B, H, W, C] → (output [B, H, W, C], gates with [n, B]
        fields).
        """
        block = self._block(run[0])  # unbound: applied as a pure function per step
        names = [info.name for info in run]
        stacked = {
            col: jax.tree.map(lambda *a: jnp.stack(a), *[self.variables[col][n] for n in names])
            for col in ("params", "batch_stats")
        }

        def body(h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
            variables, threshold, block_noise = xs
            kwargs = dict(train=train, gate_mode=mode, threshold=threshold, noise=block_noise)
            if not train:
                h, gate = block.apply(variables, h, **kwargs)
                return h, (gate, variables["batch_stats"])
            (h, gate), updates = block.apply(variables, h, mutable=["batch_stats"], **kwargs)
            return h, (gate, updates["batch_stats"])

        x, (gates, stats) = jax.lax.scan(body, x, (stacked, thresholds, noise))
        if train:
            for i, name in enumerate(names):
                self.put_variable("batch_stats", name, jax.tree.map(lambda a, i=i: a[i], stats))
        return x, gates


def stack_rows(parts: Sequence[jax.Array], starts: Sequence[jax.Array]) -> jax.Array:
    """Concatenate ``parts`` ([n_i, B] each) into [L, B].

    ``starts`` holds each part's first row (n_0 + … + n_{i-1}) as int32 scalars. The gradient
    reads each part's rows with a dynamic slice at its start, rather than the static slice of
    the concatenation's own gradient: with the starts hidden from the compiler, as
    :meth:`ResNet.__call__` passes them, the backward pass of every gate is the same code.
    """
    return _stack_rows(tuple(p.shape[0] for p in parts), list(parts), tuple(starts))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stack_rows(sizes: tuple[int, ...], parts: list[jax.Array], starts: tuple) -> jax.Array:
    del sizes, starts
    return jnp.concatenate(parts)


def _stack_rows_fwd(sizes: tuple[int, ...], parts: list[jax.Array], starts: tuple) -> tuple:
    return jnp.concatenate(parts), starts


def _stack_rows_bwd(sizes: tuple[int, ...], starts: tuple, ct: jax.Array) -> tuple:
    rows = [jax.lax.dynamic_slice_in_dim(ct, s, n) for s, n in zip(starts, sizes, strict=True)]
    return rows, None


_stack_rows.defvjp(_stack_rows_fwd, _stack_rows_bwd)


def _runs(infos: Sequence[BlockInfo]) -> list[list[int]]:
    """Indices of ``infos`` grouped into runs of consecutive identical blocks.

    Blocks are identical when their class, widths, stride and gated flag agree: then they have
    the same shapes and variables and can share one compiled body.
    """
    runs: list[list[int]] = []
    previous = None
    for i, info in enumerate(infos):
        key = dataclasses.replace(info, name="", stage=0, index=0)
        if key == previous:
            runs[-1].append(i)
        else:
            runs.append([i])
        previous = key
    return runs


ModelFactory = Callable[..., nn.Module]

#: Backbones by name. A factory takes ``num_classes``, ``gated``, ``gate_cls`` and ``dtype``
#: keywords and returns a module with ``block_infos()`` whose call returns a ModelOutput.
MODELS: Registry[ModelFactory] = Registry("model")

#: Default number of classes of each registered name (the dataset it is usually trained on).
DEFAULT_NUM_CLASSES: dict[str, int] = {}


def cifar_resnet(depth: int, **kwargs: Any) -> ResNet:
    """A CIFAR ResNet of ``depth`` = 6n + 2 (three stages of n basic blocks, widths 16/32/64)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    kwargs.setdefault("num_classes", 10)
    return ResNet(
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
            ResNet,
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
    scan_blocks: bool = False,
) -> nn.Module:
    """Build the registered model ``name``.

    Args:
      name: a registry name, e.g. "resnet110_cifar" or "resnet50" (see ``MODELS.names()``).
      num_classes: defaults to the model's usual dataset (10 for CIFAR names, 1000 otherwise).
      gated: True/False for every block, or one flag per block (``rates < 1`` of a schedule).
      gate: a name from :data:`aig_jax.gates.GATES`.
      gate_options: keyword arguments of the gate class, e.g. ``{"tau": 1.0}``.
      dtype: "float32" or "bfloat16" compute (parameters stay float32).
      scan_blocks: apply runs of identical blocks with ``lax.scan`` (see :class:`ResNet`);
        only for models that have the attribute.
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
    model = factory(num_classes=num_classes, gated=flags, gate_cls=gate_cls, dtype=DTYPES[dtype])
    if scan_blocks:
        if not hasattr(model, "scan_blocks"):
            raise ValueError(f"model {name!r} has no scan_blocks option")
        model = model.clone(scan_blocks=True)
    model.block_infos()  # validates the gated flags against the depth now, not at first call
    return model


def num_blocks(name: str) -> int:
    """Number of residual blocks of the registered model ``name``."""
    return len(MODELS.get(name)(num_classes=1, gated=False).block_infos())
