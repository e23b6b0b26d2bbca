"""Errors in what a user gave: the command-line tools print them as one ``error: …`` line.

Anything else (a bug, an unexpected failure) keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A bad config, dataset, checkpoint or workdir, with a message that says what to change."""


class ConfigError(UserError, ValueError):
    """A config field is missing, unknown, removed or has a value outside its choices."""


class DataError(UserError, ValueError):
    """A dataset file or split cannot be used (wrong format, labels or size)."""


class WorkdirError(UserError):
    """The workdir cannot be used: not writable, held by another run, or already finished."""
