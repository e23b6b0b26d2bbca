"""Batches placed on the mesh ahead of time by a background thread."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax import sharding
from aig_jax.sharding import PREFETCH_THREAD, batch_sharded, make_mesh, prefetch_to_mesh


def _batches(n, fail_at=None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"bad record in batch {i}")
        yield {"image": np.full((8, 2, 2, 3), i, np.uint8), "label": np.arange(8, dtype=np.int32)}


def _first_pixel(batch):
    return int(np.asarray(batch["image"])[0, 0, 0, 0])


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD and t.is_alive()]


@pytest.mark.parametrize("size", [0, 1, 3])
def test_batches_arrive_in_order_sharded_over_the_mesh(size):
    mesh = make_mesh(8)
    got = list(prefetch_to_mesh(_batches(5), mesh, size=size))
    assert [_first_pixel(b) for b in got] == [0, 1, 2, 3, 4]
    for batch in got:
        assert batch["image"].sharding == batch_sharded(mesh)
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 2, 2, 3)
        np.testing.assert_array_equal(batch["label"], np.arange(8))
    assert not _prefetch_threads()


def test_an_error_in_the_input_is_raised_in_the_consumer_after_the_good_batches():
    batches = prefetch_to_mesh(_batches(5, fail_at=2), make_mesh(1))
    assert _first_pixel(next(batches)) == 0
    assert _first_pixel(next(batches)) == 1
    with pytest.raises(ValueError, match="bad record in batch 2"):
        next(batches)
    assert not _prefetch_threads()


def test_closing_early_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield {"image": np.full((1, 2, 2, 3), i % 256, np.uint8)}
            i += 1

    batches = prefetch_to_mesh(endless(), make_mesh(1), size=2)
    next(batches)
    time.sleep(0.2)  # the thread fills the queue and waits
    assert len(_prefetch_threads()) == 1
    batches.close()
    assert not _prefetch_threads()


def test_compile_together_is_the_jitted_function_itself_in_one_process():
    jitted = jax.jit(lambda x: x + 1)
    assert sharding.compile_together(jitted, "f") is jitted


def test_compile_together_compiles_then_waits_once_per_program(monkeypatch):
    """With two processes (faked), each new program is compiled, then the barrier is passed,
    then it runs; a program already seen runs at once."""
    events: list[str] = []
    lowered_compile = jax.stages.Lowered.compile

    def record_compile(self, *args, **kwargs):
        events.append("compile")
        return lowered_compile(self, *args, **kwargs)

    def barrier(*, key: str, timeout_ms: int) -> None:
        assert timeout_ms == sharding.COMPILE_BARRIER_TIMEOUT_S * 1000
        events.append(key)

    def scale(x, mode):
        events.append(f"trace {mode} {x.shape}")
        return x * (2.0 if mode == "double" else 3.0)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding.ocp.multihost, "get_barrier_sync_fn", lambda: barrier)
    monkeypatch.setattr(jax.stages.Lowered, "compile", record_compile)
    step = sharding.compile_together(jax.jit(scale, static_argnums=(1,)), "scale")
    outputs = [
        step(jnp.ones(3), "double"),
        step(jnp.full(3, 2.0, jnp.float32), "double"),  # the same program
        step(jnp.ones(3), "triple"),  # another static argument
        step(jnp.ones(4), "double"),  # another shape
        step(jnp.full(3, 2.0), "double"),  # weakly typed: another program
    ]
    want = [[2.0] * 3, [4.0] * 3, [3.0] * 3, [2.0] * 4, [4.0] * 3]
    for out, want_out in zip(outputs, want, strict=True):
        np.testing.assert_array_equal(out, want_out)
    keys = [e for e in events if e.startswith("aig_jax_compiled_")]
    assert len(keys) == len(set(keys)) == 4 and all(k.endswith("_scale") for k in keys)
    assert events == [
        "trace double (3,)", "compile", keys[0],
        "trace triple (3,)", "compile", keys[1],
        "trace double (4,)", "compile", keys[2],
        "trace double (3,)", "compile", keys[3],
    ]  # fmt: skip
