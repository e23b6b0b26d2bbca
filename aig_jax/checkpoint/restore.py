"""The one way back from a checkpoint, for training and for evaluation.

:func:`restore_or_init` resumes from the newest checkpoint of a directory (or the one a path
names), checks that it holds the expected model, verifies every array against its checksum,
and, when the caller owns the directory, falls back past corrupt checkpoints and moves them
aside; with no checkpoint it starts from another run's weights (``init_from``) or returns None.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from aig_jax.checkpoint.store import (
    CheckpointError,
    CorruptCheckpointError,
    read_arrays,
    read_meta,
    resolve,
    set_aside,
    steps_in,
)
from aig_jax.errors import WorkdirError
from aig_jax.model.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class Saved:
    """What a checkpoint gave back.

    ``step`` is the step to continue from (0 after ``init_from``); ``variables`` are
    ``{"params", "batch_stats"}``; ``opt_state`` is None unless it was asked for; ``meta`` is
    the checkpoint's JSON and ``directory`` its checkpoints directory.
    """

    step: int
    variables: dict[str, Any]
    opt_state: Any
    meta: dict[str, Any]
    directory: str


def stored_spec(meta: Mapping[str, Any], where: str) -> ModelSpec:
    """The :class:`ModelSpec` a checkpoint's ``meta`` records; :class:`CheckpointError` naming
    ``where`` when it has none."""
    if "model" not in meta:
        raise CheckpointError(f"checkpoint {where} has no model spec")
    return ModelSpec.from_json(meta["model"])


def _restore(
    directory: str,
    step: int,
    variables_like: Any,
    opt_state_like: Any | None,
    spec: ModelSpec | None,
) -> Saved:
    """The checkpoint at ``step``, refused before any array is read when it holds another
    model than ``spec`` (None: any model)."""
    if spec is not None:
        meta, _, _ = read_meta(os.path.join(directory, str(step)))
        problem = spec.mismatch(stored_spec(meta, f"{directory}/{step}"))
        if problem:
            raise CheckpointError(
                f"checkpoint step {step} in {directory} is for another model: {problem}"
            )
    variables, opt_state, meta = read_arrays(directory, step, variables_like, opt_state_like)
    return Saved(step, variables, opt_state, meta, directory)


def restore_or_init(
    path: str,
    variables_like: Any,
    opt_state_like: Any | None,
    spec: ModelSpec | None,
    *,
    init_from: str | None = None,
    final_step: int | None = None,
    fallback: bool = False,
) -> Saved | None:
    """Restore the checkpoint at ``path``, else start from ``init_from``, else None.

    ``path`` is a workdir, a checkpoints directory or one step's directory (see
    :func:`~aig_jax.checkpoint.store.resolve`); without a step the newest checkpoint is
    restored. ``*_like`` are arrays or ShapeDtypeStructs whose shapes, dtypes and shardings the
    restored arrays take (``opt_state_like`` None: the optimiser state is not read). Every
    checkpoint is checked to hold the model ``spec`` (its architecture, class count, gate and
    gated blocks; None accepts any) and its arrays against their checksums.

    With ``fallback`` the caller owns ``path``, a checkpoints directory (created when missing),
    as training does: a corrupt checkpoint is passed over for the newest one that verifies, and
    the corrupt ones newer than it move to ``<path>_corrupt/``; without it the first corrupt
    one raises. When the directory holds no checkpoint, the variables of ``init_from`` (any
    path :func:`resolve` takes) come back at step 0 without an optimiser state. A checkpoint
    past ``final_step`` is a :class:`~aig_jax.errors.WorkdirError`; one at ``final_step`` comes
    back like any other, for the caller to see that the run has finished.

    Raises :class:`CheckpointError` for another model or when no checkpoint can be restored
    (naming the newest one's problem), :class:`CorruptCheckpointError` without ``fallback``.
    """
    directory, named = (os.path.abspath(path), None) if fallback else resolve(path)
    steps = [named] if named is not None else steps_in(directory, create=fallback)
    if not steps:
        if init_from is None:
            return None
        saved = restore_or_init(init_from, variables_like, None, spec)
        if saved is None:
            raise CheckpointError(f"init_from {init_from}: no checkpoint there")
        logging.info("initialised from %s (step %d)", saved.directory, saved.step)
        return dataclasses.replace(saved, step=0)
    if final_step is not None and steps[-1] > final_step:
        raise WorkdirError(
            f"{directory} is already at step {steps[-1]}, past this run's final step "
            f"{final_step}; train longer or use another --workdir"
        )
    corrupt: list[tuple[int, CorruptCheckpointError]] = []
    for step in reversed(steps):
        try:
            saved = _restore(directory, step, variables_like, opt_state_like, spec)
        except CorruptCheckpointError as err:
            if not fallback:
                raise
            logging.warning("%s", err)
            corrupt.append((step, err))
            continue
        for bad, _ in corrupt:
            logging.warning(
                "checkpoint step %d is corrupt: moved to %s; resuming from step %d",
                bad, set_aside(directory, bad), step,
            )  # fmt: skip
        return saved
    raise CheckpointError(
        f"no checkpoint in {directory} can be restored; the newest: {corrupt[0][1]}"
    )
