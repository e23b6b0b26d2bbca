"""One run per workdir: a lock file that the run's process 0 holds while it trains.

``<workdir>/run.lock`` is created with ``O_EXCL`` (so exactly one creator succeeds) and holds
JSON ``{"pid", "host", "started"}``. A second run finds it and stops with a
:class:`~aig_jax.errors.WorkdirError` naming the holder; a lock left by a process of this host
that no longer runs (killed, out of memory) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import jax
from absl import logging

from aig_jax.errors import WorkdirError

LOCK_FILE = "run.lock"


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (perhaps another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> dict[str, Any] | None:
    """The lock's record; None when the file is gone, ``{}`` when it is not a valid record."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    ok = isinstance(record, dict) and isinstance(record.get("pid"), int) and record["pid"] > 0
    return record if ok else {}


def _create(path: str, record: dict[str, Any]) -> bool:
    """Create the lock holding ``record``; False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as err:
        raise WorkdirError(
            f"workdir {os.path.dirname(path)} is not writable ({err.strerror or err})"
        ) from None
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    return True


def _take_over(path: str, stale: dict[str, Any]) -> None:
    """Remove the lock ``stale`` of a dead process, unless another run replaced it meanwhile.

    The lock is moved aside (an atomic rename) and checked there, so of two runs taking over
    the same stale lock, the slower one does not delete the faster one's new lock.
    """
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another run moved it first
        return
    if _read(aside) != stale:  # a new run's lock: put it back
        os.rename(aside, path)
        return
    logging.warning(
        "took over %s: pid %d (started %s) no longer runs",
        path, stale["pid"], stale.get("started"),
    )  # fmt: skip
    os.remove(aside)


def _acquire(path: str, record: dict[str, Any]) -> None:
    """Create the lock, taking over one left by a dead process of this host."""
    while not _create(path, record):
        holder = _read(path)
        if holder is None:  # released meanwhile
            continue
        if not holder:
            raise WorkdirError(
                f"workdir {os.path.dirname(path)} has a lock {path} that is not a run's record; "
                "delete it if no run uses this workdir"
            )
        if holder.get("host") == record["host"] and not _running(holder["pid"]):
            _take_over(path, holder)
            continue
        raise WorkdirError(
            f"workdir {os.path.dirname(path)} is in use by pid {holder['pid']} on host "
            f"{holder.get('host')} since {holder.get('started')}; stop it or use another "
            f"--workdir (if that run is gone, delete {path})"
        )


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Create ``workdir`` if needed and, on process 0, hold its lock until the block exits.

    Raises :class:`~aig_jax.errors.WorkdirError` when the workdir cannot be created or written
    or another live run holds it. Other processes only check that the workdir is writable.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"cannot create workdir {workdir} ({err.strerror or err})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir} is not writable")
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": now.isoformat(timespec="seconds"),
    }
    _acquire(path, record)
    try:
        yield
    finally:
        if _read(path) == record:
            os.remove(path)
