"""SIGTERM and SIGINT as a flag that the training loop reads, so it can checkpoint and exit."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from absl import logging


class StopOnSignal:
    """Turns the first SIGTERM/SIGINT into a flag, so the loop can checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        logging.warning("signal %d: saving a checkpoint before exiting", signum)
        self.requested = True
        signal.signal(signum, self._previous[signum])  # a second signal acts as usual

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
