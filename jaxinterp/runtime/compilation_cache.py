"""JAX's persistent compilation cache, for library calls as for the binaries, safe to share.

JAX compiles every kernel the first time a process runs it (seconds on a CPU for the EAP-IG kernel
or the circuit forward of a GPT-2-sized model). With the persistent cache on, a later process with
the same model and batch shapes reads the compiled executable back instead. The binaries turn it on
(`--compilation_cache`, default `default_dir()`); a script or notebook calls `enable()` once, before
its first jitted call:

    import jaxinterp.runtime.compilation_cache
    jaxinterp.runtime.compilation_cache.enable()          # ~/.cache/jaxinterp/xla, or
    $JAXINTERP_COMPILATION_CACHE

It is not turned on by importing jaxinterp: it is process-wide JAX state.

Many processes may share one directory (parallel tests, several runs, a directory synced between
machines): `enable` installs `AtomicFileCache`, which writes each entry to a temporary file in the
directory and renames it into place, so a reader sees a complete entry or none. (JAX's own file
cache, `jax._src.lru_cache.LRUCache` in jax 0.10, writes the entry file in place with
`Path.write_bytes`: a process reading it meanwhile got a truncated executable, which crashed it.)
`stats()` counts this process's hits, misses and writes; `find_circuit` reports them in `meta`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading

import jax
from jax._src import compilation_cache as _jax_cache  # the hook for a cache of our own
from jax._src.compilation_cache_interface import CacheInterface

ENV = "JAXINTERP_COMPILATION_CACHE"
MIN_COMPILE_SECONDS = 0.5  # kernels that compile faster than this are not written
SUFFIX = "-cache"  # an entry's file is `{key}-cache`, as JAX's own file cache names it


def default_dir() -> str:
  """$JAXINTERP_COMPILATION_CACHE if set (empty: no cache), else ~/.cache/jaxinterp/xla."""
  return os.environ.get(ENV, os.path.join(os.path.expanduser("~"), ".cache", "jaxinterp", "xla"))


class AtomicFileCache(CacheInterface):
  """A directory of compiled executables (JAX's `CacheInterface`) that concurrent processes can
  share: an entry is written to a temporary file beside it and renamed into place (atomic on a
  POSIX file system), so it is either absent or complete. Entries are never evicted.

  Attributes:
    hits, misses, writes: lookups that found an entry, lookups that did not, entries written, in
      this process.
  """

  def __init__(self, path: str):
    self._path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    self._lock = threading.Lock()
    self.hits = self.misses = self.writes = 0

  def _file(self, key: str) -> str:
    if not key or os.sep in key:
      raise ValueError(f"bad cache key {key!r}")
    return os.path.join(self._path, key + SUFFIX)

  def get(self, key: str) -> bytes | None:
    """The entry of `key`, or None."""
    try:
      with open(self._file(key), "rb") as f:
        value = f.read()
    except FileNotFoundError:
      value = None
    with self._lock:
      if value is None:
        self.misses += 1
      else:
        self.hits += 1
    return value

  def put(self, key: str, value: bytes) -> None:
    """Write the entry of `key` (kept as it is if another process wrote it first)."""
    target = self._file(key)
    if os.path.exists(target):
      return
    fd, tmp = tempfile.mkstemp(dir=self._path, prefix=f".{key}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(value)
      os.replace(tmp, target)
    except BaseException:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
      raise
    with self._lock:
      self.writes += 1

  def clear(self) -> None:
    """Remove every entry."""
    for name in os.listdir(self._path):
      if name.endswith(SUFFIX):
        with contextlib.suppress(FileNotFoundError):
          os.unlink(os.path.join(self._path, name))


def enable(path: str | None = None) -> str | None:
  """Turn on the persistent compilation cache at `path` (default `default_dir()`), written through
  `AtomicFileCache`; an empty path leaves it off. Returns the directory used, or None. Raises
  OSError if it cannot be created."""
  path = default_dir() if path is None else path
  if not path:
    return None
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  _install(path)
  return path


def _install(path: str) -> None:
  """Make `AtomicFileCache(path)` the cache JAX reads and writes (replacing one already set up)."""
  try:
    _jax_cache.reset_cache()
    with _jax_cache._cache_initialized_mutex:
      _jax_cache._cache = AtomicFileCache(path)
      _jax_cache._cache_initialized = True
  except AttributeError as e:  # a jax without these internals: its own (non-atomic) file cache
    logging.warning("jax %s: cannot install the atomic compilation cache (%s); JAX's own file "
                    "cache is used", jax.__version__, e)


def stats() -> dict:
  """This process's persistent-cache figures: {"dir", "hits", "misses", "writes"} (dir None and
  zeros while `enable` has not installed the cache)."""
  cache = getattr(_jax_cache, "_cache", None)
  if not isinstance(cache, AtomicFileCache):
    return {"dir": None, "hits": 0, "misses": 0, "writes": 0}
  with cache._lock:
    return {"dir": cache._path, "hits": cache.hits, "misses": cache.misses,
            "writes": cache.writes}


def since(before: dict) -> dict:
  """`stats()` counted from `before` (an earlier `stats()`): {"dir", "hits", "misses",
  "writes"}."""
  now = stats()
  return dict(now, **{k: now[k] - before[k] if now["dir"] == before["dir"] else now[k]
                      for k in ("hits", "misses", "writes")})
