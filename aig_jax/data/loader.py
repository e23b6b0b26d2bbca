"""Deterministic, resumable batch iterators over a :class:`~aig_jax.data.sources.Source`.

A training batch is a pure function of ``(seed, step)``: global step s belongs to epoch
e = s // steps_per_epoch, whose order is ``np.random.default_rng([seed, e]).permutation(N)``;
the step takes the next ``global_batch`` positions of that order (the remainder of an epoch is
dropped), and its augmentation draws from ``np.random.default_rng([seed, 1_000_003, s])``.
Process p of P keeps rows ``[p·b, (p+1)·b)`` of the global batch, b = global_batch / P. So a
run resumed at step k sees exactly the batches it would have seen, with any process count.

Batches are assembled by a thread pool (grain's prefetching ``MapDataset`` → ``IterDataset``),
in step order.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np

from aig_jax.data.preprocess import eval_transform, train_transform
from aig_jax.data.sources import Source
from aig_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
AUGMENT_STREAM = 1_000_003


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches in one pass over ``num_examples`` (the remainder is dropped)."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    if num_examples < global_batch:
        raise DataError(
            f"dataset of {num_examples} examples is smaller than one global batch of {global_batch}"
        )
    return num_examples // global_batch


def num_eval_batches(num_examples: int, global_batch: int, limit: int | None = None) -> int:
    """Global batches that cover the first ``min(limit, num_examples)`` examples (last padded)."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    return -(-_eval_count(num_examples, limit) // global_batch)


def _eval_count(num_examples: int, limit: int | None) -> int:
    if limit is None:
        return num_examples
    if limit <= 0:
        raise ConfigError(f"eval limit must be positive or None, got {limit}")
    return min(limit, num_examples)


def _process_share(
    global_batch: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    """``(p, b)``: this process's index and its rows per global batch."""
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count <= 0 or not 0 <= p < count:
        raise ValueError(f"process_index {p} must lie in [0, process_count={count})")
    if global_batch <= 0 or global_batch % count:
        raise ValueError(
            f"global_batch {global_batch} must be a positive multiple of process_count {count}"
        )
    return p, global_batch // count


def _threaded(
    make_batch: Callable[[int], Batch],
    start: int,
    stop: int,
    num_threads: int,
    prefetch: int | None,
) -> Iterator[Batch]:
    """``make_batch(i)`` for i = start … stop - 1, in order, up to ``prefetch`` of them computed
    ahead by ``min(num_threads, prefetch)`` threads (``prefetch`` None: as many as threads, so
    every thread has a batch to work on; 0: synchronously)."""
    prefetch = num_threads if prefetch is None else prefetch
    dataset = grain.MapDataset.range(start, stop).map(make_batch)
    # Grain can keep only ``prefetch`` items in flight and warns about idle extra threads.
    options = grain.ReadOptions(
        num_threads=min(num_threads, prefetch), prefetch_buffer_size=prefetch
    )
    return iter(dataset.to_iter_dataset(options))


def train_iterator(
    source: Source,
    cfg: Any,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 8,
    prefetch: int | None = None,
    normalised: bool = True,
) -> Iterator[Batch]:
    """This process's share of the training batches of steps ``start_step, start_step + 1, …``.

    ``cfg`` is the dataset config (preprocessing fields). Yields ``{"image": float32 [b, S, S,
    3], "label": int32 [b]}``, b = global_batch / process_count (defaults: JAX's process index
    and count), for ``num_steps`` steps (None: endlessly). Batches depend only on ``(seed,
    step)``; see the module docstring. ``normalised=False`` yields the augmented uint8 pixels
    instead, for a step that normalises on the device (a quarter of the bytes to move).
    """
    num_examples = len(source)
    spe = steps_per_epoch(num_examples, global_batch)
    p, b = _process_share(global_batch, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if num_steps is not None and num_steps < 0:
        raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}")

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(num_examples)

    def make_batch(step: int) -> Batch:
        epoch, position = divmod(step, spe)
        first = position * global_batch + p * b
        images, labels = source.read(order(epoch)[first : first + b])
        rng = np.random.default_rng([seed, AUGMENT_STREAM, step])
        image = train_transform(
            images, rng, cfg, offset=p * b, global_batch=global_batch, normalised=normalised
        )
        return {"image": image, "label": np.asarray(labels, np.int32)}

    stop = sys.maxsize if num_steps is None else start_step + num_steps
    return _threaded(make_batch, start_step, stop, num_threads, prefetch)


def eval_iterator(
    source: Source,
    cfg: Any,
    *,
    global_batch: int,
    limit: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 8,
    prefetch: int | None = None,
    normalised: bool = True,
) -> Iterator[Batch]:
    """This process's share of examples 0 … M-1 in order, M = min(limit, N), each once.

    Yields ``num_eval_batches(N, global_batch, limit)`` batches of ``{"image": float32 [b, S,
    S, 3], "label": int32 [b], "mask": bool [b], "index": int64 [b]}``; rows past M (only in
    the last global batch) are padding with mask False, label 0, index -1 and a zero image.
    ``normalised=False`` yields the uint8 pixels instead of the normalised image.
    """
    count = _eval_count(len(source), limit)
    p, b = _process_share(global_batch, process_index, process_count)
    s = cfg.image_size

    def make_batch(k: int) -> Batch:
        index = k * global_batch + p * b + np.arange(b, dtype=np.int64)
        mask = index < count
        valid = int(mask.sum())  # the valid rows are a prefix
        image = np.zeros((b, s, s, 3), np.float32 if normalised else np.uint8)
        label = np.zeros(b, np.int32)
        if valid:
            images, labels = source.read(index[:valid])
            image[:valid] = eval_transform(images, cfg, normalised=normalised)
            label[:valid] = labels
        return {"image": image, "label": label, "mask": mask, "index": np.where(mask, index, -1)}

    num_batches = num_eval_batches(len(source), global_batch, limit)
    return _threaded(make_batch, 0, num_batches, num_threads, prefetch)
