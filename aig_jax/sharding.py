"""The one device mesh of the package: data parallelism over a ``('data',)`` axis.

Model state is replicated (``P()``); batches are split along their first axis (``P('data')``).
Each process supplies only its share of a global batch, and
``jax.make_array_from_process_local_data`` assembles the global array, so the same code runs
on one CPU, one GPU or a multi-host TPU pod.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from aig_jax.errors import ConfigError

T = TypeVar("T")


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ``('data',)`` mesh over all devices (or the first ``num_devices``)."""
    n = jax.device_count() if num_devices is None else num_devices
    if not 1 <= n <= jax.device_count():
        raise ConfigError(f"num_devices must be in [1, {jax.device_count()}], got {n}")
    devices = jax.devices()[:n]
    return jax.make_mesh(
        (n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), devices=devices
    )


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Sharding of model state: a full copy on every device."""
    return jax.NamedSharding(mesh, jax.P())


def replicated_like(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``jax.ShapeDtypeStruct`` of each leaf of ``tree`` (arrays or abstract values), replicated
    over ``mesh``: the target of a restore, or the arguments of a compile, without arrays."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)), tree
    )


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Sharding of batches: the leading axis split over ``data``."""
    return jax.NamedSharding(mesh, jax.P("data"))


def check_batch_size(global_batch: int, mesh: jax.sharding.Mesh) -> None:
    """Raise ``ValueError`` unless ``global_batch`` splits evenly over devices and processes."""
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch % devices or global_batch % processes:
        raise ConfigError(
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


#: How long (seconds) a process waits at :func:`compile_together`'s barrier for the others to
#: finish compiling. A process that died is reported sooner by the distributed runtime.
COMPILE_BARRIER_TIMEOUT_S = 1800
_barrier_ids = itertools.count()


def _signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What decides which program ``jit`` runs: the pytree structure, and each leaf's abstract
    value (arrays: shape, dtype, weak type, sharding) or value (strings, Python numbers).
    ``x.aval`` of a ``jax.Array`` is what ``jax.typeof`` returns, read without its overhead."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        x.aval if isinstance(x, jax.Array) else jax.typeof(x) if hasattr(x, "dtype") else x
        for x in leaves
    )


def compile_together(jitted: Callable[..., T], name: str) -> Callable[..., T]:
    """``jitted`` (a ``jax.jit`` function) whose programs start on every process together.

    Each process compiles a program on its own, and a busy host can take much longer than
    another; a collective whose peer is late fails (CPU gloo collectives give up after 30 s).
    So in a multi-process run, the first call with each new signature (shapes, dtypes, static
    arguments) compiles the program ahead of time, waits at a coordination-service barrier
    until every process has compiled it, and only then runs it; later calls go straight to
    ``jitted``, which reuses the compiled program. Every process must make the same sequence
    of calls, as SPMD code does. In a single-process run ``jitted`` itself is returned.
    """
    if jax.process_count() == 1:
        return jitted
    barrier = ocp.multihost.get_barrier_sync_fn()
    compiled: set[tuple[Any, ...]] = set()

    def call(*args: Any) -> T:
        signature = _signature(args)
        if signature not in compiled:
            jitted.lower(*args).compile()  # type: ignore[attr-defined]
            barrier(
                key=f"aig_jax_compiled_{next(_barrier_ids)}_{name}",
                timeout_ms=COMPILE_BARRIER_TIMEOUT_S * 1000,
            )
            compiled.add(signature)
        return jitted(*args)

    return call
