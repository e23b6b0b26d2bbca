"""The persistent compilation cache of the command-line tools: where it goes and what wins."""

import json
import os
import subprocess
import sys

from tests.conftest import HANG_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter: JAX's cache directory is process-wide and set by conftest here.
SCRIPT = """
import json, sys
import jax
from aig_jax.compilation_cache import use_compilation_cache
in_use = use_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.jit(lambda x: x * 2 + 1)(jax.numpy.arange(3.0)).block_until_ready()
print(json.dumps({"in_use": in_use, "jax": jax.config.jax_compilation_cache_dir}))
"""


def _run(directory, env_dir=None):
    env = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")
    }
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    if env_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = env_dir
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, directory],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compiled_programs_are_written_to_the_given_directory(tmp_path):
    target = tmp_path / "new" / "cache"  # created on demand
    result = _run(str(target))
    assert result["in_use"] == result["jax"] == str(target)
    assert any(name.startswith("jit_") for name in os.listdir(target))


def test_a_directory_from_the_environment_wins(tmp_path):
    result = _run(str(tmp_path / "ours"), env_dir=str(tmp_path / "env"))
    assert result["in_use"] == str(tmp_path / "env")
    assert not (tmp_path / "ours").exists()
    assert os.listdir(tmp_path / "env")


def test_an_empty_directory_turns_the_cache_off():
    result = _run("")
    assert result["in_use"] is None and not result["jax"]


TOGGLE = """
import os, sys
import jax
from aig_jax.compilation_cache import enable_compilation_cache, use_compilation_cache
directory = use_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
counts = []
for on, factor in ((True, 2.0), (False, 3.0), (True, 5.0)):
    enable_compilation_cache(on)
    jax.jit(lambda x: x * factor).lower(jax.numpy.arange(3.0)).compile()
    counts.append(len(os.listdir(directory)))
print(counts)
"""


def test_turning_the_cache_off_after_a_compile_stops_writes_and_on_again_resumes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", TOGGLE, str(tmp_path / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, off, on_again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first >= 1 and off == first and on_again > off
