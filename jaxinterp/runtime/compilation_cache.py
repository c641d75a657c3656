"""JAX's persistent compilation cache, for library calls as for the binaries.

JAX compiles every kernel the first time a process runs it (seconds on a CPU for the EAP-IG kernel
or the circuit forward of a GPT-2-sized model). With the persistent cache on, a later process with
the same model and batch shapes reads the compiled executable back instead. The binaries turn it on
(`--compilation_cache`); a script or notebook calls `enable()` once, before its first jitted call:

    import jaxinterp.runtime.compilation_cache
    jaxinterp.runtime.compilation_cache.enable()          # ~/.cache/jaxinterp/xla, or
    $JAXINTERP_COMPILATION_CACHE

It is not turned on by importing jaxinterp: it is process-wide JAX state, and processes that write
one cache directory at the same moment should not share it (the test suite sets
$JAXINTERP_COMPILATION_CACHE empty for that reason).
"""

from __future__ import annotations

import os

import jax

ENV = "JAXINTERP_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.5  # kernels that compile faster than this are not written


def default_dir() -> str:
  """$JAXINTERP_COMPILATION_CACHE if set (empty: no cache), else ~/.cache/jaxinterp/xla."""
  return os.environ.get(ENV, os.path.join(os.path.expanduser("~"), ".cache", "jaxinterp", "xla"))


def enable(path: str | None = None) -> str | None:
  """Turn on the persistent compilation cache at `path` (default `default_dir()`); an empty path
  leaves it off. Returns the directory used, or None. Raises OSError if it cannot be created."""
  path = default_dir() if path is None else path
  if not path:
    return None
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path
