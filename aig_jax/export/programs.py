"""The two programs of an exported model, traced from the model's own modules.

Both take ``(weights, thresholds, images)``: the model's variables as a flat list of arrays
(in :func:`flat_weights` order), thresholds [L] on p(execute) (a block executes an image where
p(execute) > its threshold; 0.5 everywhere is argmax) and raw pixels uint8 [B, S, S, 3],
normalised inside. Both return logits float32 [B, K], decisions bool [L, B] and realised
MACs float32 [B] (:meth:`aig_jax.model.flops.ModelCost.realised_macs`).

- ``batch1``: B = 1; every gated block's branch under ``lax.cond`` on the image's decision
  (:func:`aig_jax.inference.skipping.cond_branch`), so a skipped block costs no time.
- ``batched``: B symbolic; the masked residual (every branch computed, multiplied by its
  decisions), for throughput.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aig_jax.data.preprocess import normalise_pixels
from aig_jax.export import ExportError
from aig_jax.inference.skipping import BRANCHES
from aig_jax.model.flops import ModelCost
from aig_jax.model.resnet import ModelOutput

#: The skipping path (:data:`aig_jax.inference.skipping.BRANCHES`) of each program.
PROGRAM_BRANCHES = {"batch1": "cond", "batched": "masked"}

#: Platforms ``jax.export`` lowers for.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_platforms(platforms: Sequence[str], name: str = "platforms") -> None:
    """Raise :class:`~aig_jax.export.ExportError`, naming ``name`` and the unknown entries,
    unless ``platforms`` is a non-empty list of :data:`PLATFORMS`."""
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ExportError(f"{name} {unknown}: expected some of {', '.join(PLATFORMS)}")


def flat_weights(variables: Any) -> tuple[list[str], list[np.ndarray], Any]:
    """(names, host arrays, treedef) of ``variables``' leaves in flattening order; names are
    paths like ``params/stage1_block0/conv1/kernel``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    return names, [np.asarray(jax.device_get(leaf)) for _, leaf in leaves], treedef


def inference_fn(
    model: nn.Module,
    treedef: Any,
    cost: ModelCost,
    mean: Sequence[float],
    std: Sequence[float],
    branch: str,
) -> Callable[[list[jax.Array], jax.Array, jax.Array], tuple[jax.Array, ...]]:
    """``run(weights, thresholds [L], images uint8 [B, S, S, 3])`` → (logits [B, K],
    decisions bool [L, B], MACs [B]) with the gated branches of ``branch``."""

    def run(
        weights: list[jax.Array], thresholds: jax.Array, images: jax.Array
    ) -> tuple[jax.Array, ...]:
        out: ModelOutput = model.apply(  # type: ignore[assignment]  # no mutable collections
            jax.tree_util.tree_unflatten(treedef, weights),
            normalise_pixels(images, mean, std),
            gate_mode="calibrated",
            thresholds=thresholds,
            gated_branch=BRANCHES[branch],
        )
        return out.logits, out.gates > 0, cost.realised_macs(out.gates)

    return run


def export_programs(
    model: nn.Module,
    weights: Sequence[np.ndarray],
    treedef: Any,
    cost: ModelCost,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    platforms: Sequence[str],
) -> dict[str, jax.export.Exported]:
    """The ``batch1`` and ``batched`` programs of ``model`` (see the module docstring),
    lowered with ``jax.export`` for every one of ``platforms``."""
    check_platforms(platforms)
    num_blocks = len(cost.blocks)
    w_specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
    t_spec = jax.ShapeDtypeStruct((num_blocks,), jnp.float32)
    (b,) = jax.export.symbolic_shape("b")
    batches = {"batch1": 1, "batched": b}
    exported = {}
    for name, branch in PROGRAM_BRANCHES.items():
        run = inference_fn(model, treedef, cost, mean, std, branch)
        images = jax.ShapeDtypeStruct((batches[name], image_size, image_size, 3), jnp.uint8)
        exported[name] = jax.export.export(jax.jit(run), platforms=tuple(platforms))(
            w_specs, t_spec, images
        )
    return exported
