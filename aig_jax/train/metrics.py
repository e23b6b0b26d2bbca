"""Metrics as JSON lines (always) and TensorBoard events (when tensorboardX is installed).

Only process 0 writes. Each JSON line is ``{"step": int, "kind": "train" | "eval", ...}``;
lists (per-block execution rates) are written whole to JSON and element-wise to TensorBoard.
A resumed run first drops the records of the steps it replays (:meth:`MetricsWriter.drop_after`),
and :func:`read_metrics` keeps the last record of each step, so every step appears once.
:func:`mean_metrics` averages the train steps' metrics between two log lines, and
:class:`LoopTimer` measures their throughput and input waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging


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

    def drop_after(self, step: int) -> None:
        """Remove the JSON records of steps after ``step``, and lines cut short by a kill, so
        that a run resumed at ``step`` does not log the steps it replays twice."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        records = [(line, _parse(line)) for line in lines]
        kept = [line.rstrip("\n") + "\n" for line, r in records if r and r["step"] <= step]
        if kept == lines:
            return
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        logging.info(
            "%s: dropped %d records after step %d", self.path, len(lines) - len(kept), step
        )

    def close(self) -> None:
        """Flush and close TensorBoard files."""
        if self._tb is not None:
            self._tb.close()


def mean_metrics(fetched: list[dict[str, np.ndarray]], count_skipped: bool) -> dict[str, Any]:
    """Means over the steps whose update was applied; with ``count_skipped`` also
    ``skipped_steps``, the number of the others."""
    applied = [m for m in fetched if m["finite"]] or fetched
    means: dict[str, Any] = {
        k: np.mean([m[k] for m in applied], axis=0, dtype=np.float64)
        for k in fetched[0]
        if k != "finite"
    }
    if count_skipped:
        means["skipped_steps"] = len(fetched) - sum(bool(m["finite"]) for m in fetched)
    return means


class LoopTimer:
    """Training throughput between log lines, leaving out evaluation and checkpointing.

    ``input_wait_fraction`` is the share of the training time the loop spent waiting for the
    host input pipeline: near 0 when the device (or dispatch) is the bottleneck, near 1 when
    the pipeline starves the device.
    """

    def __init__(self, step: int) -> None:
        self._tick = time.perf_counter()
        self._step = step
        self._paused = 0.0
        self._waited = 0.0

    def wait_for(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
        """The next batch (None at the end), timing the wait."""
        start = time.perf_counter()
        batch = next(batches, None)
        self._waited += time.perf_counter() - start
        return batch

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def lap(self, step: int, batch_size: int) -> dict[str, float]:
        """``images_per_sec`` and ``input_wait_fraction`` since the last lap (the metrics
        fetched just before were waited for, so the device has finished those steps)."""
        now = time.perf_counter()
        seconds = max(now - self._tick - self._paused, 1e-9)
        out = {
            "images_per_sec": (step - self._step) * batch_size / seconds,
            "input_wait_fraction": self._waited / seconds,
        }
        self._tick, self._step, self._paused, self._waited = now, step, 0.0, 0.0
        return out


def _parse(line: str) -> dict[str, Any] | None:
    """The record of one JSON line; None for a blank or unreadable one (cut short by a kill)."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def read_metrics(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of ``<workdir>/metrics.jsonl`` (optionally only one ``kind``), in order.

    A step logged again by a resumed run counts once: the last record of each (step, kind,
    evaluator) wins. A last line cut short by a kill is left out; any other line that is not
    JSON is a ``ValueError`` naming it.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    latest: dict[tuple, dict[str, Any]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            record = _parse(line)
            if record is None:
                if line.strip() and line.endswith("\n"):
                    raise ValueError(f"{path} line {number} is not a JSON record: {line[:80]!r}")
                continue
            key = (record["step"], record["kind"], record.get("evaluator", record.get("gate_mode")))
            latest.pop(key, None)  # re-inserted: ordered by the last record
            latest[key] = record
    return [r for r in latest.values() if kind is None or r["kind"] == kind]
