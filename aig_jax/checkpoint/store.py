"""Orbax checkpoints on disk: model variables, optimizer state and JSON metadata, per step.

Layout of ``<workdir>/checkpoints/<step>/``: ``model`` (``params`` and ``batch_stats``),
``opt`` (``opt_state``; absent in converted checkpoints) and ``meta`` (JSON: the
:class:`~aig_jax.model.spec.ModelSpec`, the config, the step, the epoch and a CRC-32 of every
saved array). Orbax writes each step to a temporary directory and renames it when complete, so
an interrupted save never replaces the last good checkpoint. Restores go into abstract arrays
that carry the *current* shardings, so a checkpoint saved on 8 devices restores onto 1 (and
vice versa).

Orbax (tensorstore's OCDBT/zarr chunks) does not verify array data: a flipped bit or a few
overwritten bytes load as other numbers. Every read here therefore checks the restored arrays
against the checksums recorded at save and raises :class:`CorruptCheckpointError` on a
mismatch. Checksums are over the bytes of each whole (global) array, so they hold whatever the
sharding and the number of devices or hosts at save and at restore.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from aig_jax.errors import UserError

MODEL, OPT, META = "model", "opt", "meta"
#: The meta field holding ``{array path: "dtype:crc32"}`` of every saved array.
CHECKSUMS = "checksums"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files cannot be read, or an array does not match its checksum."""


def _whole(leaf: Any) -> Any:
    """``leaf`` in a form whose host copy is the whole array on every process.

    Replicated arrays (the training state) use their first local copy; arrays sharded across
    processes are gathered with ``process_allgather`` (a collective: every process calls it,
    in the same order, since all of them flatten the same tree).
    """
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if leaf.is_fully_replicated:
            return leaf.addressable_data(0)
        return multihost_utils.process_allgather(leaf, tiled=True)
    return leaf


def _crc(array: np.ndarray) -> str:
    """``"dtype:crc32"`` of an array's bytes in C order."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return f"{flat.dtype}:{zlib.crc32(flat.view(np.uint8).data):08x}"


def checksums(tree: Any) -> dict[str, str]:
    """``{path: "dtype:crc32"}`` of every array leaf of ``tree`` (paths like
    ``params/block1/conv1/kernel``), over the bytes of each whole array.

    Copies the arrays to the host in one transfer; blocks until they are computed.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    host = jax.device_get([_whole(leaf) for _, leaf in leaves])
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): _crc(np.asarray(value))
        for (path, _), value in zip(leaves, host, strict=True)
    }


def _others(steps: list[int], step: int) -> str:
    """The hint naming the other checkpoints of a directory, for error messages."""
    others = [s for s in steps if s != step]
    return f"; other checkpoints here: steps {', '.join(map(str, others))}" if others else ""


def _verify(
    directory: str, step: int, meta: Mapping[str, Any], tree: Any, steps: list[int]
) -> None:
    """Check the restored arrays of ``tree`` against the checksums in ``meta``.

    Raises :class:`CorruptCheckpointError` naming the first array that differs. A checkpoint
    whose meta has no checksums loads with a warning.
    """
    recorded = meta.get(CHECKSUMS)
    if recorded is None:
        logging.warning(
            "checkpoint step %d in %s has no checksums: its arrays cannot be verified",
            step,
            directory,
        )
        return
    for path, actual in checksums(tree).items():
        expected = recorded.get(path)
        if expected == actual:
            continue
        if expected is not None and expected.split(":")[0] != actual.split(":")[0]:
            logging.warning(
                "checkpoint step %d in %s: array %s saved as %s, restored as %s: not verified",
                step, directory, path, expected.split(":")[0], actual.split(":")[0],
            )  # fmt: skip
            continue
        problem = "has no checksum" if expected is None else "does not match its checksum"
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {directory}: array {path} {problem} (corrupt data)"
            + _others(steps, step)
        )


def _check_step(directory: str, step: int, meta: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose meta names another step than its directory."""
    if "step" in meta and meta["step"] != step:
        raise CheckpointError(
            f"checkpoint {os.path.join(directory, str(step))}: its meta says step "
            f"{meta['step']}, not {step} (a step directory renamed or copied over?)"
        )


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

    Every process must call :meth:`save` (Orbax coordinates them). Reading is
    :func:`aig_jax.checkpoint.restore_or_init`'s.
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

        ``meta`` gets ``step`` and the checksums of the arrays, computed here, before the
        arrays can be donated to the next step (one host copy of the state per save). The
        files are written in the background; :meth:`wait_until_finished` or :meth:`close`
        waits for them.
        """
        sums = checksums({**variables, "opt_state": opt_state})
        meta = {**meta, "step": step, CHECKSUMS: sums}
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

    def wait_until_finished(self) -> None:
        """Block until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self._manager.wait_until_finished()
        self._manager.close()


def _barrier(name: str) -> None:
    """Wait for every process (nothing to wait for with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _shorten(text: str, limit: int = 400) -> str:
    """Orbax errors can print whole pytrees; keep the start."""
    return text if len(text) <= limit else text[:limit] + " ..."


def _unreadable(
    directory: str, step: int, steps: list[int], err: Exception
) -> CorruptCheckpointError:
    """The error for a checkpoint whose files Orbax cannot read into the requested arrays."""
    return CorruptCheckpointError(
        f"checkpoint step {step} in {directory} could not be restored "
        f"({type(err).__name__}: {_shorten(str(err))})" + _others(steps, step)
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


def steps_in(directory: str, *, create: bool = False) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, oldest first.

    ``create`` makes the directory when it does not exist (every process alike: a choice made
    on what one process sees of a shared filesystem could part them at Orbax's barriers).
    """
    manager = _manager(directory, create=create)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _restore_items(directory: str, step: int | None, **items: Any) -> tuple[dict, int, list]:
    """Restore the named items (``model=ocp.args.StandardRestore(...)``, …) of the checkpoint at
    ``step`` (default: the latest) in ``directory``; returns them, the step and all steps.

    The meta is always restored, and its step checked against the directory's.
    """
    manager = _manager(directory)
    try:
        step = manager.latest_step() if step is None else step
        steps = sorted(manager.all_steps())
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        try:
            args = ocp.args.Composite(**{META: ocp.args.JsonRestore(), **items})
            restored = manager.restore(step, args=args)
        except Exception as err:  # Orbax raises many types for unreadable files
            raise _unreadable(directory, step, steps, err) from err
    finally:
        manager.close()
    _check_step(directory, step, restored[META])
    return dict(restored), step, steps


def read_meta(path: str) -> tuple[dict[str, Any], str, int]:
    """(meta, checkpoint directory, step) of the checkpoint at ``path`` (see :func:`resolve`)."""
    directory, step = resolve(path)
    restored, step, _ = _restore_items(directory, step)
    return dict(restored[META]), directory, step


def read_arrays(
    directory: str, step: int, variables_like: Any, opt_state_like: Any | None = None
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(variables, opt_state, meta) of the checkpoint at ``step``, verified against their
    checksums; opt_state is read only when ``opt_state_like`` is given (else None).

    ``*_like`` are pytrees of arrays or ShapeDtypeStructs whose shapes, dtypes and shardings the
    restored arrays take. Raises :class:`CorruptCheckpointError` naming the step when the files
    cannot be read or an array does not match its checksum, and :class:`CheckpointError` when
    the meta names another step.
    """
    items = {MODEL: ocp.args.StandardRestore(_abstract(variables_like))}
    if opt_state_like is not None:
        items[OPT] = ocp.args.StandardRestore({"opt_state": _abstract(opt_state_like)})
    restored, step, steps = _restore_items(directory, step, **items)
    variables = dict(restored[MODEL])
    opt_state = restored[OPT]["opt_state"] if opt_state_like is not None else None
    arrays = variables if opt_state is None else {**variables, "opt_state": opt_state}
    _verify(directory, step, restored[META], arrays, steps)
    return variables, opt_state, dict(restored[META])


def load_variables(directory: str, step: int, variables_like: Any) -> dict[str, Any]:
    """Only the model variables ({"params", "batch_stats"}) at ``step``, verified (see
    :func:`read_arrays`)."""
    return read_arrays(directory, step, variables_like)[0]


def set_aside(directory: str, step: int) -> str:
    """Move the checkpoint at ``step`` to ``<directory>_corrupt/<step>`` (``<step>.1``, … when
    taken), out of reach of the rotation, and return that path.

    Process 0 moves it; every process must call this.
    """
    base = os.path.join(directory + "_corrupt", str(step))
    target, n = base, 0
    while os.path.exists(target):
        n += 1
        target = f"{base}.{n}"
    _barrier(f"aig_jax: set aside checkpoint {step}")  # every process has chosen `target`
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(directory, str(step)), target)
    _barrier(f"aig_jax: checkpoint {step} set aside")
    return target


def save_variables(
    directory: str, step: int, variables: Mapping[str, Any], meta: Mapping[str, Any]
) -> None:
    """Write a checkpoint holding only model variables and metadata (no optimizer state).

    Used by converters: ``eval.py --checkpoint DIRECTORY`` evaluates it directly, and training
    can start from it. ``meta`` gets ``step`` and the variables' checksums.
    """
    meta = {**meta, "step": step, CHECKSUMS: checksums(dict(variables))}
    manager = _manager(directory, create=True)
    manager.save(
        step,
        args=ocp.args.Composite(
            **{
                MODEL: ocp.args.StandardSave(dict(variables)),
                META: ocp.args.JsonSave(meta),
            }
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
