"""A trained model for evaluation: its spec, variables and config, read from a checkpoint."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from aig_jax import checkpoint
from aig_jax.errors import NonFiniteError
from aig_jax.model.spec import ModelSpec
from aig_jax.model.variables import abstract_variables
from aig_jax.sharding import replicated_like


@dataclasses.dataclass(frozen=True)
class Restored:
    """A model restored from a checkpoint, with the config it is evaluated under."""

    spec: ModelSpec
    model: nn.Module
    variables: dict[str, Any]
    config: Any
    directory: str
    step: int


def restore(path: str, mesh: jax.sharding.Mesh, config: Any | None = None) -> Restored:
    """Restore the checkpoint at ``path`` (workdir, checkpoints dir or one step's dir; a
    workdir's newest checkpoint), replicated over ``mesh``.

    Without ``config`` the training config stored in the checkpoint is used. Raises
    :class:`~aig_jax.checkpoint.CheckpointError` when there is no checkpoint, its data is
    corrupt (no fallback to another step) or ``config`` describes another model (another
    architecture, class count, gate or set of gated blocks), and
    :class:`~aig_jax.errors.NonFiniteError` when a variable holds NaN or infinity.
    """
    meta, directory, step = checkpoint.read_meta(path)
    spec = checkpoint.stored_spec(meta, f"{directory}/{step}")
    expected = spec if config is None else ModelSpec.from_config(config)
    if config is None:
        config = ml_collections.ConfigDict(meta.get("config") or {})
    model = spec.build()
    size = config.dataset.image_size
    like = replicated_like(abstract_variables(model, (size, size, 3)), mesh)
    saved = checkpoint.restore_or_init(os.path.join(directory, str(step)), like, None, expected)
    assert saved is not None  # the step exists: read_meta read it
    check_finite(saved.variables, f"checkpoint {directory} step {step}")
    return Restored(spec, model, saved.variables, config, directory, step)


def check_finite(variables: Any, where: str) -> None:
    """Raise :class:`~aig_jax.errors.NonFiniteError` naming ``where`` and the first variable
    of ``variables`` that holds NaN or infinity."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        values = np.asarray(jax.device_get(leaf))
        if not np.isfinite(values).all():
            bad = values[~np.isfinite(values)].flat[0]
            raise NonFiniteError(
                f"{where} holds {bad} in {jax.tree_util.keystr(path)}: its training diverged; "
                "evaluate an earlier checkpoint (--checkpoint <workdir>/checkpoints/<step>)"
            )
