"""What the experiment binaries share: the shared flags, holding `--out`, and the flag-bound wrappers of
`jaxinterp.runtime.inputs` (loading `--model` and `--task`/`--data`, reading a circuit's provenance).

Every user-facing failure is an `app.UsageError` or an `inputs.InputError` with one clear line
naming the flag, file or row, so a binary never ends in a stack trace from deep inside jit
(`cli.run` prints it as one line).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import app

from jaxinterp import models, tasks
from jaxinterp.experiments import cli
from jaxinterp.runtime import compilation_cache, files, inputs

TOY = inputs.TOY
# $JAXINTERP_COMPILATION_CACHE overrides the default (the test suite sets it empty: processes that
# write one cache concurrently must not share it).
COMPILATION_CACHE = compilation_cache.default_dir()
cli.define("string", "compilation_cache", COMPILATION_CACHE,
           "Directory of JAX's persistent compilation cache: a later run with the same model shape "
           "and batch shapes reuses the compiled kernels instead of recompiling. Empty disables it. "
           "The default comes from $JAXINTERP_COMPILATION_CACHE when set.")
cli.define("string", "mib_split", "train",
           "The split read when --data is a directory holding a local copy of an MIB dataset.")
SKIP_BAD_ROWS_HELP = ("Leave out --data rows that cannot be used (prompts of unequal token lengths, "
                      "bad labels) and report them, instead of stopping at them.")


def positive(name: str, value: int, minimum: int = 1) -> int:
  """`value`, or a usage error naming `--name` if it is below `minimum`."""
  if value is None or value < minimum:
    raise app.UsageError(f"--{name}={value}: must be at least {minimum}")
  return value


def enable_compilation_cache() -> Optional[str]:
  """Turn on JAX's persistent compilation cache at `--compilation_cache` (if not empty)."""
  path = cli.value("compilation_cache", COMPILATION_CACHE)
  try:
    return compilation_cache.enable(path)
  except OSError as e:
    raise app.UsageError(f"--compilation_cache={path}: {e}") from None


# ------------------------------------------------------------------------------------------ --out


@contextlib.contextmanager
def run_dir(out: str, flag: str = "out") -> Iterator[files.RunDir]:
  """Hold `--out` for this run (`files.RunDir`): refused if it is a file or another run holds it;
  removed again if the run fails before writing anything into it."""
  if not out:
    raise app.UsageError(f"--{flag} is required (an output directory)")
  held = files.RunDir(out)
  try:
    held.acquire()
  except files.OutputDirError as e:
    raise app.UsageError(f"--{flag}: {e}") from None
  try:
    yield held
  except BaseException:
    held.release(failed=True)
    raise
  held.release()


# ------------------------------------------------------------------------------- models and data


def load_model(name: str, dtype=None) -> models.Model:
  """`inputs.load_model`, after turning on the persistent compilation cache (`--compilation_cache`)."""
  enable_compilation_cache()
  return inputs.load_model(name, dtype)


def load_dataset(model: models.Model, model_name: str, task: str, data: Optional[str],
                 n_examples: int, prepend_bos: bool = True, seed: int = 0,
                 skip_bad_rows: bool = False) -> tasks.Dataset:
  """`inputs.load_dataset`, reading an MIB copy's `--mib_split`."""
  return inputs.load_dataset(model, model_name, task, data, n_examples, prepend_bos, seed,
                             skip_bad_rows, mib_split=cli.value("mib_split", "train"))


# ------------------------------------------------------------------------- a circuit's provenance


def _usable(meta: Mapping[str, Any]) -> dict:
  """meta with `model` and `data` replaced by the absolute paths recorded beside them, if present."""
  view = dict(meta)
  if isinstance(meta.get("model_path"), str) and os.path.isdir(meta["model_path"]):
    view["model"] = meta["model_path"]
  if isinstance(meta.get("data_path"), str) and os.path.isfile(meta["data_path"]):
    view["data"] = meta["data_path"]
  return view


def _same(name: str, a: Any, b: Any) -> bool:
  if name in ("model", "data") and isinstance(a, str) and isinstance(b, str):
    resolve = inputs.resolve_model_path if name == "model" else (lambda x: x)
    return os.path.realpath(resolve(a)) == os.path.realpath(resolve(b))
  return a == b


def settings_from_meta(meta: Mapping[str, Any], defaults: Mapping[str, Any], source: str,
                       unwarned: Sequence[str] = ()) -> dict:
  """The value of each flag in `defaults`: as given on the command line, else as recorded in `meta`
  (how the circuit was found), else the binary's default. Flags given with a value other than
  meta's are listed in one warning line, except those in `unwarned` (checked otherwise, as the
  model is by its hash)."""
  view = _usable(meta)
  out, overrides = {}, []
  for name, default in defaults.items():
    if cli.given(name):
      out[name] = cli.FLAGS[name].value
      if name in view and name not in unwarned and not _same(name, out[name], view[name]):
        overrides.append(f"--{name}={out[name]} (meta: {view[name]})")
    else:
      out[name] = view.get(name, default)
  if overrides:
    cli.warn(f"{', '.join(overrides)} override{'s' if len(overrides) == 1 else ''} how {source} "
             f"was found, as its meta records it")
  return out
