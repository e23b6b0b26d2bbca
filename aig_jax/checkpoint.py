"""Orbax checkpoints: model variables, optimizer state and JSON metadata, per step.

Layout of ``<workdir>/checkpoints/<step>/``: ``model`` (``params`` and ``batch_stats``),
``opt`` (``opt_state``; absent in converted checkpoints) and ``meta`` (JSON: the
:class:`~aig_jax.model.spec.ModelSpec`, the config, the epoch). Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never replaces the
last good checkpoint. Restores go into abstract arrays that carry the *current* shardings, so
a checkpoint saved on 8 devices restores onto 1 (and vice versa).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from aig_jax.errors import UserError

MODEL, OPT, META = "model", "opt", "meta"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def _manager(
    directory: str,
    *,
    max_to_keep: int | None = None,
    async_save: bool = False,
    create: bool = False,
) -> ocp.CheckpointManager:
    """The one way this package opens a checkpoint directory."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=create
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=(MODEL, OPT, META)
    )


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings, when the leaves have them) of a pytree of arrays."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves when asked and keeps the last ``max_to_keep`` checkpoints.

    Every process must call :meth:`save` and :meth:`restore` (Orbax coordinates them).
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self._manager = _manager(
            self.directory, max_to_keep=max_to_keep, async_save=async_save, create=True
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        variables: Mapping[str, Any],
        opt_state: Any,
        meta: Mapping[str, Any],
    ) -> None:
        """Start saving ``variables`` ({"params", "batch_stats"}), ``opt_state`` and ``meta``.

        The save completes in the background; :meth:`wait_until_finished` or :meth:`close`
        waits for it.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    MODEL: ocp.args.StandardSave(dict(variables)),
                    OPT: ocp.args.StandardSave({"opt_state": opt_state}),
                    META: ocp.args.JsonSave(dict(meta)),
                }
            ),
            force=True,
        )

    def restore(
        self, variables_like: Any, opt_state_like: Any, step: int | None = None
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Restore (variables, opt_state, meta) at ``step`` (default: latest).

        ``*_like`` are pytrees of arrays or ShapeDtypeStructs whose shardings the restored
        arrays take. Raises :class:`CheckpointError` naming the step if it cannot be read.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        MODEL: ocp.args.StandardRestore(_abstract(variables_like)),
                        OPT: ocp.args.StandardRestore({"opt_state": _abstract(opt_state_like)}),
                        META: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as err:  # Orbax raises many types for unreadable files
            raise _unreadable(self.directory, step, self.all_steps(), err) from err
        return restored[MODEL], restored[OPT]["opt_state"], dict(restored[META])

    def wait_until_finished(self) -> None:
        """Block until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()


def _shorten(text: str, limit: int = 400) -> str:
    """Orbax errors can print whole pytrees; keep the start."""
    return text if len(text) <= limit else text[:limit] + " ..."


def _unreadable(directory: str, step: int, steps: list[int], err: Exception) -> CheckpointError:
    earlier = [s for s in steps if s < step]
    hint = (
        f"; delete {os.path.join(directory, str(step))} to fall back to step {earlier[-1]}"
        if earlier
        else ""
    )
    return CheckpointError(
        f"checkpoint at step {step} in {directory} could not be restored "
        f"({type(err).__name__}: {_shorten(str(err))}){hint}"
    )


def resolve(path: str) -> tuple[str, int | None]:
    """Map a user path to (checkpoint directory, step or None for the latest).

    Accepts a workdir (containing ``checkpoints/``), a checkpoints directory, or one step's
    directory (``.../checkpoints/1200``).
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory at {path}")
    if os.path.isdir(os.path.join(path, META)):
        parent, name = os.path.split(path)
        if name.isdigit():
            return parent, int(name)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None


def _restore_items(directory: str, step: int | None, **items: Any) -> tuple[dict, int]:
    """Restore the named items (``meta=ocp.args.JsonRestore()``, …) of the checkpoint at
    ``step`` (default: the latest) in ``directory``; returns them and the step."""
    manager = _manager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # Orbax raises many types for unreadable files
            raise _unreadable(directory, step, sorted(manager.all_steps()), err) from err
    finally:
        manager.close()
    return dict(restored), step


def read_meta(path: str) -> tuple[dict[str, Any], str, int]:
    """(meta, checkpoint directory, step) of the checkpoint at ``path`` (see :func:`resolve`)."""
    directory, step = resolve(path)
    restored, step = _restore_items(directory, step, **{META: ocp.args.JsonRestore()})
    return dict(restored[META]), directory, step


def load_variables(directory: str, step: int, variables_like: Any) -> dict[str, Any]:
    """Restore only the model variables ({"params", "batch_stats"}) at ``step``, with the
    shapes, dtypes and shardings of ``variables_like``."""
    item = ocp.args.StandardRestore(_abstract(variables_like))
    restored, _ = _restore_items(directory, step, **{MODEL: item})
    return dict(restored[MODEL])


def save_variables(
    directory: str, step: int, variables: Mapping[str, Any], meta: Mapping[str, Any]
) -> None:
    """Write a checkpoint holding only model variables and metadata (no optimizer state).

    Used by converters: ``eval.py --checkpoint DIRECTORY`` evaluates it directly, and training
    can start from it.
    """
    manager = _manager(directory, create=True)
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                MODEL: ocp.args.StandardSave(dict(variables)),
                META: ocp.args.JsonSave(dict(meta)),
            }
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
