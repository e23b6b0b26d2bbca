"""What ``train.py`` and ``eval.py`` share: checked ``--config.*`` overrides and one-line errors.

``run(main)`` replaces ``absl.app.run(main)``: a missing ``--config`` file, or an override of a
field the config does not have (``--config.foo=1``), is a :class:`~aig_jax.errors.ConfigError`
(that suggests the closest field names), and any :class:`~aig_jax.errors.UserError` ends the
program with one ``error: …`` line (see :func:`~aig_jax.errors.exit_on_user_error`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import app, flags

from aig_jax.errors import ConfigError, exit_on_user_error
from aig_jax.train.config_checks import REMOVED

_PREFIX = "--config."


def _field_names(node: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, Mapping):
            yield from _field_names(value, f"{prefix}{key}.")


def check_override_names(config: Any, names: list[str]) -> None:
    """Raise :class:`ConfigError` for the first of ``names`` (dotted paths such as
    ``dataset.source``) that is not a field of ``config``, naming the closest fields (or the
    replacement of a removed one)."""
    fields = set(_field_names(config.to_dict()))
    for name in names:
        if name in REMOVED and name not in fields:
            raise ConfigError(f"config.{name} was removed (--config.{name}): {REMOVED[name]}")
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=3, cutoff=0.6)
            hint = (
                f"did you mean {' or '.join(f'--config.{c}' for c in close)}?"
                if close
                else "configs/default.py lists every field"
            )
            raise ConfigError(f"the config has no field {name!r} (--config.{name}); {hint}")


def _config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config=PATH`` or ``--config PATH``)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """Parse ``argv`` like absl does, first checking that the ``--config`` file exists and
    that every ``--config.NAME`` override is one of its fields."""
    names = [a[len(_PREFIX) :].split("=")[0] for a in argv[1:] if a.startswith(_PREFIX)]
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):  # FILE[:ARGUMENT]
        raise ConfigError(f"--config {path}: no such config file")
    if names and path is not None and "config" in flags.FLAGS:
        check_override_names(flags.FLAGS["config"].parser.parse(path), names)
    return flags.FLAGS(argv)


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with checked overrides and user errors as one line (exit 2)."""
    app.run(exit_on_user_error(main), flags_parser=exit_on_user_error(parse_flags))
