"""Test set-up: eight fake CPU devices (for sharding tests) before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess
import sys
import tempfile

import jax  # after XLA_FLAGS is set
import pytest

# Many tests compile the same small programs; JAX's persistent cache compiles each once per run
# (the cache key covers the program and the JAX version, so a stale entry cannot be used).
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "aig_jax_tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Wall-clock limit of a test's subprocess: a guard against hangs only, set far above any
#: normal run, since on a loaded 2-core machine compiling one train step alone took minutes.
HANG_GUARD_S = 1800


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in the repository (its package first on the path); text output."""
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def user_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error: …`` line of a command line stopped by a user error (exit status 2)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture
def rngs():
    """Fresh ``params`` and ``gumbel`` keys for ``Module.init``/``apply``."""
    return {"params": jax.random.key(0), "gumbel": jax.random.key(1)}
