"""Checkpoints: what is saved per step (:mod:`.store`) and the one way back (:mod:`.restore`)."""

from aig_jax.checkpoint.restore import Saved, restore_or_init, stored_spec
from aig_jax.checkpoint.store import (
    CHECKSUMS,
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
    checksums,
    load_variables,
    read_meta,
    resolve,
    save_variables,
)

__all__ = [
    "CHECKSUMS",
    "CheckpointError",
    "Checkpointer",
    "CorruptCheckpointError",
    "Saved",
    "checksums",
    "load_variables",
    "read_meta",
    "resolve",
    "restore_or_init",
    "save_variables",
    "stored_spec",
]
