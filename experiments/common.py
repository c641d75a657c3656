"""What the experiment binaries share: resolving `--model`, loading `--task`/`--data`, and errors.

Every user-facing failure is raised as `app.UsageError` with one clear line, so a binary never ends in
a stack trace from deep inside jit.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import jax
import numpy as np
from absl import app

import models
from experiments import cli
from jaxinterp import tasks

TOY = "toy"
COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxinterp", "xla")
cli.define("string", "compilation_cache", COMPILATION_CACHE,
           "Directory of JAX's persistent compilation cache: a later run with the same model shape "
           "and batch shapes reuses the compiled kernels instead of recompiling. Empty disables it.")


def enable_compilation_cache() -> Optional[str]:
  """Turn on JAX's persistent compilation cache at `--compilation_cache` (if not empty)."""
  path = cli.value("compilation_cache", COMPILATION_CACHE)
  if not path:
    return None
  path = os.path.expanduser(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise app.UsageError(f"--compilation_cache={path}: {e}") from None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


def resolve_model_path(name: str) -> str:
  """`toy` -> the bundled model's directory; anything else is used as given (a path)."""
  if name == TOY:
    from jaxinterp.toy import TOY_MODEL_DIR
    return TOY_MODEL_DIR
  return name


def load_model(name: str, dtype=None) -> models.Model:
  """Load `--model` (HF dir, orbax conversion, or `toy`), turning checkpoint errors into usage errors.

  Also turns on the persistent compilation cache (`--compilation_cache`).
  """
  enable_compilation_cache()
  path = resolve_model_path(name)
  try:
    kw = {} if dtype is None else {"dtype": dtype}
    return models.from_pretrained(path, **kw)
  except (models.CheckpointError, models.ConfigError) as e:
    raise app.UsageError(f"--model={name}: {e}") from None


def model_hash(model: models.Model) -> str:
  """sha256 over the config and every parameter's bytes (identifies the exact weights)."""
  h = hashlib.sha256(repr(sorted(model.cfg.to_dict().items())).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def bos_id(model: models.Model) -> int:
  c = model.cfg
  if c.bos_token_id is not None:
    return int(c.bos_token_id)
  if c.eos_token_id is not None:
    return int(c.eos_token_id)
  return 0


def load_dataset(model: models.Model, model_name: str, task: str, data: Optional[str],
                 n_examples: int, prepend_bos: bool = True, seed: int = 0) -> tasks.Dataset:
  """The task's prompt pairs: generated for `induction` (no CSV needed), else read from `--data`."""
  if n_examples < 1:
    raise app.UsageError(f"--n_examples must be positive, got {n_examples}")
  if data and not os.path.isfile(data):
    raise app.UsageError(f"--data={data}: no such file")
  if task == "induction" and not data:
    if model_name == TOY:
      from jaxinterp import toy
      try:
        return toy.induction_task_dataset(n_examples, seed=seed)
      except toy.ToyDataError as e:
        raise app.UsageError(str(e)) from None
    return tasks.make_induction(n_examples, 8, model.cfg.d_vocab, seed=seed,
                                bos_id=bos_id(model) if prepend_bos else None)
  if not data:
    raise app.UsageError(f"--data (a CSV of prompt pairs) is required for --task={task}")
  if model.tokenizer is None:
    raise app.UsageError(f"--model={model_name} has no tokenizer.json; it cannot read text CSVs")
  try:
    return tasks.load_task(task, data, model.tokenizer, n_examples=n_examples,
                           prepend_bos=prepend_bos,
                           bos_id=bos_id(model) if prepend_bos else None,
                           vocab_size=model.cfg.d_vocab)
  except tasks.TaskError as e:
    raise app.UsageError(str(e)) from None


def ensure_out_dir(out: str) -> str:
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise app.UsageError(f"--out={out}: cannot create directory: {e}") from None
  return out
