"""What the experiment binaries share: the shared flags (`--compilation_cache`, `--mib_split`) and
the flag-bound wrappers of `jaxinterp.runtime.inputs` (loading `--model` and `--task`/`--data`,
holding `--out`).

Every user-facing failure is an `app.UsageError` or an `inputs.InputError` with one clear line
naming the flag, file or row, so a binary never ends in a stack trace from deep inside jit
(`cli.run` prints it as one line).
"""

from __future__ import annotations

from absl import app

from jaxinterp import models, tasks
from jaxinterp.experiments import cli
from jaxinterp.runtime import compilation_cache, inputs

TOY = inputs.TOY
# $JAXINTERP_COMPILATION_CACHE overrides the default (the test suite sets it empty: processes that
# write one cache concurrently must not share it).
COMPILATION_CACHE = compilation_cache.default_dir()
cli.define("string", "compilation_cache", COMPILATION_CACHE,
           "Directory of JAX's persistent compilation cache: a later run with the same model "
           "shape and batch shapes reuses the compiled kernels instead of recompiling. Empty "
           "disables it. The default comes from $JAXINTERP_COMPILATION_CACHE when set.")
cli.define("string", "mib_split", "train",
           "The split read when --data is a directory holding a local copy of an MIB dataset.")
SKIP_BAD_ROWS_HELP = ("Leave out --data rows that cannot be used (prompts of unequal token "
                      "lengths, bad labels) and report them, instead of stopping at them.")

positive = inputs.positive  # `--name=value: must be at least minimum`
run_dir = inputs.run_dir  # holds `--out` for one run (`files.RunDir`)


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


def load_model(name: str, dtype=None) -> models.Model:
  """`inputs.load_model`, after turning on the persistent compilation cache
  (`--compilation_cache`)."""
  enable_compilation_cache()
  return inputs.load_model(name, dtype)


def load_dataset(model: models.Model, model_name: str, task: str, data: str | None,
                 n_examples: int, prepend_bos: bool = True, seed: int = 0,
                 skip_bad_rows: bool = False) -> tasks.Dataset:
  """`inputs.load_dataset`, reading an MIB copy's `--mib_split`."""
  return inputs.load_dataset(model, model_name, task, data, n_examples, prepend_bos, seed,
                             skip_bad_rows, mib_split=mib_split())
