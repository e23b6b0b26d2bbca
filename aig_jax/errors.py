"""Errors in what a user gave: the command-line tools print them as one ``error: …`` line.

Anything else (a bug, an unexpected failure) keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

#: The exit status of a command line stopped by a :class:`UserError`.
USER_ERROR_EXIT = 2

_P = ParamSpec("_P")
_R = TypeVar("_R")


class UserError(Exception):
    """A bad config, dataset, checkpoint or workdir, with a message that says what to change."""


class ConfigError(UserError, ValueError):
    """A config field is missing, unknown, removed or has a value outside its choices."""


class DataError(UserError, ValueError):
    """A dataset file or split cannot be used (wrong format, labels or size)."""


class WorkdirError(UserError):
    """The workdir cannot be used: not writable, held by another run, or already finished."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced NaN or infinite values, or a checkpoint holds them."""


def exit_on_user_error(main: Callable[_P, _R]) -> Callable[_P, _R]:
    """Wrap a command line's ``main``: a :class:`UserError` it raises is printed as one
    ``error: …`` line on stderr and the process exits with :data:`USER_ERROR_EXIT`; any
    other exception propagates with its traceback."""

    @functools.wraps(main)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print("error: " + " ".join(str(err).split()), file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None

    return run
