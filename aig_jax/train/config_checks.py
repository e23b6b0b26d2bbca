"""Validation of training configs: fail at start, naming the field, not hours into a run.

Each set of choices is defined once, beside the code that implements it, and imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aig_jax.data import SOURCES
from aig_jax.data.preprocess import PREPROCESSORS
from aig_jax.errors import ConfigError
from aig_jax.eval.suite import check_evals
from aig_jax.model.gates import GATES
from aig_jax.model.initialisers import INITS
from aig_jax.model.resnet import DTYPES, MODELS
from aig_jax.model.schedules import GATE_RATE_ONE_BLOCKS, SCHEDULES
from aig_jax.train.losses import NORMALIZE
from aig_jax.train.optim import GATE_LR_PARAMS
from aig_jax.train.step import ON_NONFINITE

#: Fields a config may not set, with what to use instead (one that is off is accepted).
REMOVED = {
    "scan_blocks": "blocks are not scanned; the persistent compilation cache "
    "(train.py --compilation_cache, on by default) answers repeated compiles",
    "eval_gate_modes": "list the evaluators in config.evals, e.g. "
    "{'argmax': {'type': 'classification', 'mode': 'argmax'}} (configs/default.py)",
}


def _field(config: Any, name: str) -> Any:
    node = config
    for part in name.split("."):
        if part not in node:
            raise ConfigError(f"config.{name} is missing")
        node = node[part]
    return node


def _check(config: Any, name: str, ok: Callable[[Any], bool], expected: str) -> None:
    value = _field(config, name)
    try:
        good = ok(value)
    except (TypeError, ValueError):
        good = False
    if not good:
        raise ConfigError(f"config.{name} = {value!r}: expected {expected}")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def validate_config(config: Any) -> None:
    """Raise :class:`ConfigError` (a ``ValueError``) naming the first invalid, missing or
    removed field of a training config."""
    for name, replacement in REMOVED.items():
        if config.get(name):
            raise ConfigError(f"config.{name} was removed: {replacement}")
    _check(config, "model", lambda v: v in MODELS, f"one of {MODELS.names()}")
    _check(config, "gate", lambda v: v in GATES, f"one of {GATES.names()}")
    _check(config, "gate_options", lambda v: hasattr(v, "items"), "a dict of gate options")
    _check(config, "dtype", lambda v: v in DTYPES, f"one of {sorted(DTYPES)}")
    _check(config, "dataset.source", lambda v: v in SOURCES, f"one of {SOURCES.names()}")
    _check(config, "dataset.num_classes", _positive_int, "a positive integer")
    _check(config, "dataset.image_size", _positive_int, "a positive integer")
    _check(config, "dataset.preprocess", lambda v: v in PREPROCESSORS, f"one of {PREPROCESSORS}")
    _check(config, "batch_size", _positive_int, "a positive integer")
    _check(config, "eval_batch_size", _positive_int, "a positive integer")
    _check(config, "num_epochs", lambda v: v >= 0, "a non-negative number of epochs")
    _check(config, "num_train_steps", lambda v: isinstance(v, int), "an integer (-1: epochs)")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError("config.num_epochs and config.num_train_steps are both 0: nothing to do")
    _check(config, "learning_rate", lambda v: v > 0, "a positive number")
    _check(config, "momentum", lambda v: 0 <= v < 1, "a number in [0, 1)")
    _check(config, "nesterov", lambda v: isinstance(v, bool), "True or False")
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
    if not _field(config, "target_rates"):  # an explicit list is checked against the model
        _check(config, "target_schedule", lambda v: v in SCHEDULES, f"one of {SCHEDULES.names()}")
    _check(config, "target_weight", lambda v: v >= 0, "a non-negative weight λ")
    _check(
        config,
        "gate_rate_one_blocks",
        lambda v: v in GATE_RATE_ONE_BLOCKS,
        f"one of {GATE_RATE_ONE_BLOCKS}",
    )
    _check(config, "init", lambda v: v in INITS, f"one of {INITS}")
    _check(config, "target_loss_normalize", lambda v: v in NORMALIZE, f"one of {NORMALIZE}")
    _check(config, "gate_lr_factor", lambda v: v >= 0, "a non-negative factor")
    _check(config, "gate_lr_params", lambda v: v in GATE_LR_PARAMS, f"one of {GATE_LR_PARAMS}")
    _check(config, "on_nonfinite", lambda v: v in ON_NONFINITE, f"one of {ON_NONFINITE}")
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "data_threads"):
        _check(config, name, _positive_int, "a positive integer")
    _check(config, "eval_every_epochs", lambda v: v > 0, "a positive number of epochs")
    _check(config, "eval_limit", _optional(_positive_int), "None or a positive integer")
    _check(config, "num_devices", lambda v: isinstance(v, int) and v >= 0, "0 (all) or a count")
    _check(config, "seed", lambda v: isinstance(v, int), "an integer")
    _check(config, "init_from", _optional(lambda v: isinstance(v, str)), "None or a path")
    for name in ("tensorboard", "progress"):
        _check(config, name, lambda v: isinstance(v, bool), "True or False")
    evals = _field(config, "evals")
    check_evals(evals)
