"""`jaxinterp.runtime.compilation_cache.enable` turns on JAX's persistent cache for library calls.
"""

import os
import subprocess
import sys

from jaxinterp.runtime import compilation_cache


def _run(code, env):
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
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
