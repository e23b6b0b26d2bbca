"""JAX's persistent compilation cache, on by default for ``train.py`` and ``eval.py``.

Compiling a deep network takes long (see bench/README.md for the AIG-ResNet-110 train step);
with the cache, a later run of the same program — a resumed or preempted run, another seed,
an evaluation — loads the compiled program from disk instead. Entries are keyed by the program,
the devices and the JAX version, so a stale one is never used.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

#: Where the command-line tools keep compiled programs unless told otherwise.
DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "aig_jax", "jax")


def use_compilation_cache(directory: str) -> str | None:
    """Keep compiled programs in ``directory`` (created if missing; ``~`` expanded).

    A cache directory JAX already has — set with ``JAX_COMPILATION_CACHE_DIR`` or
    ``jax.config`` — wins, and ``""`` leaves the cache off. Programs that compile in under a
    second are not stored (JAX's ``jax_persistent_cache_min_compile_time_secs``).

    Returns:
      The cache directory in use, or None when there is none.
    """
    current = jax.config.values.get("jax_compilation_cache_dir")
    if current:
        return str(current)
    if not directory:
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def enable_compilation_cache(enabled: bool) -> None:
    """Turn the persistent cache on or off for this process's later compilations.

    JAX decides once, at the first compilation, whether to use the cache; the setting alone
    changes nothing after that, so the decision is reset here too.
    """
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
