"""What the experiment binaries share: the shared flags (`--compilation_cache`, `--mib_split`) and
turning on the compilation cache.

Every user-facing failure is an `app.UsageError` or an `inputs.InputError` with one clear line
naming the flag, file or row, so a binary never ends in a stack trace from deep inside jit
(`cli.run` prints it as one line).
"""

from __future__ import annotations

from absl import app

from jaxinterp.experiments import cli
from jaxinterp.runtime import compilation_cache

# $JAXINTERP_COMPILATION_CACHE overrides the default. Processes may share one cache directory: its
# entries are written atomically (`jaxinterp.runtime.compilation_cache.AtomicFileCache`).
COMPILATION_CACHE = compilation_cache.default_dir()
cli.define("string", "compilation_cache", COMPILATION_CACHE,
           "Directory of JAX's persistent compilation cache: a later run with the same model "
           "shape and batch shapes reuses the compiled kernels instead of recompiling. Empty "
           "disables it. The default comes from $JAXINTERP_COMPILATION_CACHE when set.")
cli.define("string", "mib_split", "train",
           "The split read when --data is a directory holding a local copy of an MIB dataset.")
OVERWRITE_HELP = ("Replace what --out holds: a finished run with other settings, or another "
                  "binary's outputs (refused without it). Without it a finished run with the same "
                  "settings is reported complete and left untouched.")
FILTER_HELP = ("none, or correct: keep only the rows the model gets right (clean metric above the "
               "corrupted one, by the task's own metric), as the EAP-IG and MIB papers do; the "
               "task check before it is printed and recorded in meta either way.")
SKIP_BAD_ROWS_HELP = ("Leave out --data rows that cannot be used (prompts of unequal token "
                      "lengths, bad labels) and report them, instead of stopping at them.")

def mib_split() -> str:
  """`--mib_split`: the split read from a local copy of an MIB dataset."""
  return cli.value("mib_split", "train")


def enable_compilation_cache() -> str | None:
  """Turn on JAX's persistent compilation cache at `--compilation_cache` (if not empty)."""
  path = cli.value("compilation_cache", COMPILATION_CACHE)
  try:
    return compilation_cache.enable(path)
  except OSError as e:
    raise app.UsageError(f"--compilation_cache={path}: {e}") from None
