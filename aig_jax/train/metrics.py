"""Metrics as JSON lines (always) and TensorBoard events (when tensorboardX is installed).

Only process 0 writes. Each JSON line is ``{"step": int, "kind": "train" | "eval", ...}``;
lists (per-block execution rates) are written whole to JSON and element-wise to TensorBoard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


class MetricsWriter:
    """Appends metrics to ``<workdir>/metrics.jsonl`` and, optionally, TensorBoard."""

    def __init__(self, workdir: str, *, tensorboard: bool = True) -> None:
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, kind: str, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (scalars, lists or arrays) of ``kind`` at ``step``."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **_jsonable(metrics)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in record.items():
                if name in ("step", "kind"):
                    continue
                if isinstance(value, int | float):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)
                elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{kind}/{name}/{i:03d}", v, step)
            self._tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard files."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl`` (optionally only one ``kind``)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
