"""Test set-up: eight fake CPU devices (for sharding tests) before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile

import jax  # after XLA_FLAGS is set
import pytest

# Many tests compile the same small programs; JAX's persistent cache compiles each once per run
# (the cache key covers the program and the JAX version, so a stale entry cannot be used).
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "aig_jax_tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture
def rngs():
    """Fresh ``params`` and ``gumbel`` keys for ``Module.init``/``apply``."""
    return {"params": jax.random.key(0), "gumbel": jax.random.key(1)}
