"""Test set-up: eight fake CPU devices (for sharding tests) before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # after XLA_FLAGS is set
import pytest

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture
def rngs():
    """Fresh ``params`` and ``gumbel`` keys for ``Module.init``/``apply``."""
    return {"params": jax.random.key(0), "gumbel": jax.random.key(1)}
