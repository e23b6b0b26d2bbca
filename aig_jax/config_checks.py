"""Validation of training configs: fail at start, naming the field, not hours into a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aig_jax.data import SOURCES
from aig_jax.gates import GATES
from aig_jax.model_spec import ModelSpec
from aig_jax.models import DTYPES, MODELS
from aig_jax.schedules import SCHEDULES

PREPROCESSING = ("cifar", "imagenet", "none")
TRAIN_EVAL_MODES = ("argmax", "sample", "open")


def _field(config: Any, name: str) -> Any:
    node = config
    for part in name.split("."):
        if part not in node:
            raise ValueError(f"config.{name} is missing")
        node = node[part]
    return node


def _check(config: Any, name: str, ok: Callable[[Any], bool], expected: str) -> None:
    value = _field(config, name)
    try:
        good = ok(value)
    except (TypeError, ValueError):
        good = False
    if not good:
        raise ValueError(f"config.{name} = {value!r}: expected {expected}")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def validate_config(config: Any) -> None:
    """Raise ``ValueError`` naming the first invalid field of a training config."""
    _check(config, "model", lambda v: v in MODELS, f"one of {MODELS.names()}")
    _check(config, "gate", lambda v: v in GATES, f"one of {GATES.names()}")
    _check(config, "dtype", lambda v: v in DTYPES, f"one of {sorted(DTYPES)}")
    if "scan_blocks" in config:
        _check(config, "scan_blocks", lambda v: isinstance(v, bool), "True or False")
    _check(config, "dataset.source", lambda v: v in SOURCES, f"one of {SOURCES.names()}")
    _check(config, "dataset.num_classes", _positive_int, "a positive integer")
    _check(config, "dataset.image_size", _positive_int, "a positive integer")
    _check(config, "dataset.preprocess", lambda v: v in PREPROCESSING, f"one of {PREPROCESSING}")
    _check(config, "batch_size", _positive_int, "a positive integer")
    _check(config, "eval_batch_size", _positive_int, "a positive integer")
    _check(config, "num_epochs", lambda v: v >= 0, "a non-negative number of epochs")
    _check(config, "num_train_steps", lambda v: isinstance(v, int), "an integer (-1: epochs)")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("config.num_epochs and config.num_train_steps are both 0: nothing to do")
    _check(config, "learning_rate", lambda v: v > 0, "a positive number")
    _check(config, "momentum", lambda v: 0 <= v < 1, "a number in [0, 1)")
    _check(config, "weight_decay", lambda v: v >= 0, "a non-negative number")
    _check(config, "lr_decay", lambda v: 0 < v <= 1, "a factor in (0, 1]")
    _check(
        config,
        "lr_boundaries_epochs",
        lambda v: all(b >= 0 for b in v) and list(v) == sorted(v),
        "non-negative epochs in increasing order",
    )
    _check(config, "warmup_epochs", lambda v: v >= 0, "a non-negative number")
    _check(config, "target_rate", lambda v: 0 <= v <= 1, "a rate in [0, 1]")
    if not config.get("target_rates"):
        _check(config, "target_schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES.names()}")
    _check(config, "target_weight", lambda v: v >= 0, "a non-negative weight λ")
    _check(config, "target_loss_normalize", lambda v: v in ("gated", "all"), "'gated' or 'all'")
    _check(config, "gate_lr_factor", lambda v: v >= 0, "a non-negative factor")
    _check(
        config, "gate_lr_params", lambda v: v in ("fc2", "gate", "none"), "'fc2', 'gate' or 'none'"
    )
    _check(
        config,
        "eval_gate_modes",
        lambda v: len(v) > 0 and all(m in TRAIN_EVAL_MODES for m in v),
        f"a non-empty list of {TRAIN_EVAL_MODES}",
    )
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _check(config, name, _positive_int, "a positive integer")
    _check(config, "eval_every_epochs", lambda v: v > 0, "a positive number of epochs")
    try:  # the spec resolves the schedule against the model's depth
        ModelSpec.from_config(config)
    except ValueError as err:
        raise ValueError(f"config.target_rates/target_schedule: {err}") from err
