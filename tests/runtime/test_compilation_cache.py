"""`jaxinterp.runtime.compilation_cache.enable` turns on JAX's persistent cache for library calls.
"""

import os
import subprocess
import sys

from jaxinterp.runtime import compilation_cache


def _run(code, env, args=()):
  p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                     timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  return p.stdout.strip()


def test_enable_sets_the_cache_dir_and_an_empty_path_leaves_it_off(tmp_path):
  code = ("import jax; from jaxinterp.runtime import compilation_cache as c; "
          "print(c.enable({arg})); print(jax.config.jax_compilation_cache_dir)")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  target = tmp_path / "xla"
  out = _run(code.format(arg=repr(str(target))), env).splitlines()
  assert out == [str(target), str(target)] and target.is_dir()
  out = _run(code.format(arg="''"), env).splitlines()
  assert out[0] == "None" and out[1] != str(target)
  # The default comes from $JAXINTERP_COMPILATION_CACHE (empty: off).
  env[compilation_cache.ENV] = str(tmp_path / "from-env")
  assert _run(code.format(arg=""), env).splitlines()[0] == str(tmp_path / "from-env")
  env[compilation_cache.ENV] = ""
  assert _run(code.format(arg=""), env).splitlines()[0] == "None"


# One process writes large entries while another reads each as soon as it appears. JAX's own file
# cache (jax._src.lru_cache.LRUCache, jax 0.10) writes in place and hands such a reader hundreds of
# torn entries in this loop; AtomicFileCache must hand it none.
_HAMMER = """
import hashlib, os, sys, time
from jaxinterp.runtime.compilation_cache import AtomicFileCache
role, path, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cache = AtomicFileCache(path)
if role == "write":
  for i in range(n):
    body = os.urandom(size)
    cache.put(f"k{i}", hashlib.sha256(body).digest() + body)
  print(cache.writes)
else:
  seen, torn, t0 = set(), 0, time.time()
  while len(seen) < n and time.time() - t0 < 100:
    for i in set(range(n)) - seen:
      v = cache.get(f"k{i}")
      if v is not None:
        if hashlib.sha256(v[32:]).digest() == v[:32]:
          seen.add(i)
        else:
          torn += 1
  print(len(seen), torn, cache.hits)
"""


def test_a_reader_never_sees_a_half_written_entry(tmp_path):
  n, size = 12, 4 << 20
  cache = tmp_path / "xla"
  args = [str(cache), str(n), str(size)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  reader = subprocess.Popen([sys.executable, "-c", _HAMMER, "read", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert _run(_HAMMER, env, ["write", *args]) == str(n)
  out, err = reader.communicate(timeout=120)
  assert reader.returncode == 0, err[-2000:]
  seen, torn, hits = map(int, out.split())
  assert (seen, torn) == (n, 0) and hits >= n
  # Only the entries are left: no temporary files.
  assert sorted(os.listdir(cache)) == sorted(f"k{i}{compilation_cache.SUFFIX}" for i in range(n))


# Two processes compile the same programs into one cache at once, each dropping its in-memory
# executables between rounds so that it reads the other's entries back; every result must be right
# and every read clean (JAX raises on a bad entry here instead of warning).
_COMPILE = """
import random, sys
import jax, jax.numpy as jnp, numpy as np
from jaxinterp.runtime import compilation_cache
compilation_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_raise_persistent_cache_errors", True)
rng = random.Random(int(sys.argv[2]))
consts = [np.random.default_rng(i).standard_normal(1 << 18).astype(np.float32) for i in range(4)]
for r in range(4):
  for i in rng.sample(range(4), 4):
    got = jax.jit(lambda x, c=consts[i]: (x * c).sum())(jnp.float32(r + 1))
    np.testing.assert_allclose(got, (consts[i] * (r + 1)).sum(), rtol=1e-4)
  jax.clear_caches()
s = compilation_cache.stats()
print(s["hits"], s["misses"], s["writes"])
"""


def test_two_processes_share_one_cache(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cache = str(tmp_path / "xla")
  other = subprocess.Popen([sys.executable, "-c", _COMPILE, cache, "1"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  hits, misses, writes = map(int, _run(_COMPILE, env, [cache, "2"]).split())
  out, err = other.communicate(timeout=120)
  assert other.returncode == 0, err[-2000:]
  hits2, _, writes2 = map(int, out.split())
  # 16 lookups each; the 4 programs are compiled and written at most once per process, and every
  # later round reads them back.
  assert hits + misses >= 16 and hits >= 12 and hits2 >= 12
  assert 1 <= writes + writes2 <= 8
  assert len([f for f in os.listdir(cache) if f.endswith(compilation_cache.SUFFIX)]) >= 4
