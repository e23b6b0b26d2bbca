"""The one device mesh of the package: data parallelism over a ``('data',)`` axis.

Model state is replicated (``P()``); batches are split along their first axis (``P('data')``).
Each process supplies only its share of a global batch, and
``jax.make_array_from_process_local_data`` assembles the global array, so the same code runs
on one CPU, one GPU or a multi-host TPU pod.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator, Mapping
from typing import Any

import jax
import numpy as np


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ``('data',)`` mesh over all devices (or the first ``num_devices``)."""
    n = jax.device_count() if num_devices is None else num_devices
    if not 1 <= n <= jax.device_count():
        raise ValueError(f"num_devices must be in [1, {jax.device_count()}], got {n}")
    devices = jax.devices()[:n]
    return jax.make_mesh(
        (n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices
    )


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Sharding of model state: a full copy on every device."""
    return jax.NamedSharding(mesh, jax.P())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Sharding of batches: the leading axis split over ``data``."""
    return jax.NamedSharding(mesh, jax.P("data"))


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> None:
    """Raise ``ValueError`` unless ``global_batch`` splits evenly over devices and processes."""
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch % devices or global_batch % processes:
        raise ValueError(
            f"batch size {global_batch} is not divisible by the {devices} devices "
            f"({processes} processes) of the mesh"
        )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Assemble global arrays [B, ...] from this process's share [B / processes, ...]."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


#: Name of the thread behind :func:`prefetch_to_mesh`.
PREFETCH_THREAD = "aig-jax-prefetch-to-mesh"
_END = object()


def prefetch_to_mesh(
    batches: Iterator[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh, size: int = 2
) -> Generator[dict[str, Any], None, None]:
    """:func:`shard_batch` of each of ``batches``, in order, placed by a background thread up
    to ``size`` batches ahead so that host-to-device copies overlap the running step.

    An exception raised by ``batches`` is raised here; closing the returned generator (or
    dropping it) stops the thread. ``size`` 0 places each batch when it is asked for.
    """
    if size <= 0:
        yield from (shard_batch(batch, mesh) for batch in batches)
        return
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put((shard_batch(batch, mesh), None)):
                    return
            put((_END, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((None, err))

    thread = threading.Thread(target=produce, name=PREFETCH_THREAD, daemon=True)
    thread.start()
    try:
        while True:
            item, err = ready.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Place a host pytree on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))
