"""A run's inputs and its output directory: `--model` (an HF directory, an orbax conversion or the
bundled `toy`), the task's prompt pairs, a saved circuit's provenance (`meta`, and the settings it
records), with the hashes that identify the exact weights and examples; checked numbers and files
(`positive`, `input_file`); and `run_dir`, which holds `--out` for one run.

Every failure a user can cause is an `InputError` whose message is one line naming the flag, file or
row (the binaries print it as `prog: error: ...`); `warn` prints a one-line warning on stderr. Names
in messages are the binaries' flags, which are also the fields of the pipelines' configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp import models, tasks
from jaxinterp.groundtruth import toy
from jaxinterp.runtime import files
from jaxinterp.tasks import answers

TOY = "toy"
ANSWER_TOP_K = 50  # an answer in no prompt's top-k next tokens is worth a warning
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # --dtype's values
TOKENIZER_HELP = ("A tokenizer.json, or a directory holding one (e.g. the base model's), for a "
                  "--model directory without its own tokenizer.json (or in place of it).")


class InputError(ValueError):
  """A bad input (flag value, file or row), with a one-line message that names it."""


def warn(message: str) -> None:
  """One line on stderr: `warning: message`."""
  print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def positive(name: str, value: int, minimum: int = 1) -> int:
  """`value`, or an `InputError` naming `--name` if it is below `minimum`."""
  if value is None or value < minimum:
    raise InputError(f"--{name}={value}: must be at least {minimum}")
  return value


def input_file(flag: str, path: str | None, required: str | None = None) -> str | None:
  """`path` if it names a file, else an `InputError` naming `--flag`. An empty path is an error when
  `required` is given (the text after "--flag is required"), and is returned otherwise."""
  if not path:
    if required is not None:
      raise InputError(f"--{flag} is required{required}")
    return path
  if not os.path.isfile(path):
    raise InputError(f"--{flag}={path}: no such file")
  return path


@contextlib.contextmanager
def run_dir(out: str, flag: str = "out", record: files.RunRecord | None = None,
            overwrite: bool = False) -> Iterator[files.RunDir]:
  """Hold `--out` for this run (`files.RunDir`): refused if it is a file or another run holds it
  and, given the run's `record`, if it holds another binary's outputs or a finished run with other
  settings (unless `overwrite`); `held.complete` says the same run finished there already. Removed
  again if the run fails before writing anything into it."""
  if not out:
    raise InputError(f"--{flag} is required (an output directory)")
  held = files.RunDir(out, record, overwrite)
  try:
    held.acquire()
  except files.OutputDirError as e:
    raise InputError(f"--{flag}: {e}") from None
  try:
    yield held
  except BaseException:
    held.release(failed=True)
    raise
  held.release()


def file_digest(path: str | None) -> str | None:
  """sha256 of a file's bytes (None for None or a directory): a run's settings name its input files
  by content, so that an edited CSV is not taken for the same run."""
  if not path or not os.path.isfile(path):
    return None
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def already_complete(out: str, record: files.RunRecord) -> None:
  """Print that `out` holds this run, finished: nothing is written."""
  print(f"{out} already holds this {record.describe()}, complete ({files.DONE_FILE}); nothing to "
        f"do (--overwrite reruns it)")


# ----------------------------------------------------------------------------------------- models


def resolve_model_path(name: str) -> str:
  """`toy` -> the bundled model's directory; anything else is used as given (a path)."""
  return toy.TOY_MODEL_DIR if name == TOY else name


def load_model(name: str, dtype=None, tokenizer: str | None = None) -> models.Model:
  """Load `--model` (HF dir, orbax conversion, or `toy`), turning checkpoint errors into
  `InputError`s.

  Args:
    name: the `--model` flag.
    dtype: the params' dtype (`--dtype`): "float32", "bfloat16" or a jnp dtype; None keeps the
      checkpoint's own (a bf16 checkpoint loads as bf16; float32 upcasts it).
    tokenizer: `--tokenizer`, a tokenizer.json or a directory holding one: the model's tokenizer,
      for a model directory without its own (or in place of it).
  """
  path = resolve_model_path(name)
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise InputError(f"--dtype={dtype}: choose from {', '.join(DTYPES)}")
    dtype = DTYPES[dtype]
  try:
    model = models.from_pretrained(path, dtype=dtype)
  except (models.CheckpointError, models.ConfigError) as e:
    raise InputError(f"--model={name}: {e}") from None
  if tokenizer:
    if not os.path.exists(tokenizer):
      raise InputError(f"--tokenizer={tokenizer}: no such file or directory")
    try:
      tok = models.pretrained.load_tokenizer(tokenizer)
    except models.CheckpointError as e:
      raise InputError(f"--tokenizer={tokenizer}: {e}") from None
    if tok is None:
      raise InputError(f"--tokenizer={tokenizer}: no tokenizer.json in this directory")
    model = dataclasses.replace(model, tokenizer=tok)
  return model


def model_hash(model: models.Model) -> str:
  """sha256 over the config and every parameter's bytes (identifies the exact weights).

  Only config fields that differ from their defaults count, so a field added to `ModelConfig` later
  (with a default) leaves every existing model's hash, and the graphs that record it, valid.
  """
  cfg = model.cfg
  changed = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
             if f.default is dataclasses.MISSING or getattr(cfg, f.name) != f.default]
  h = hashlib.sha256(repr(sorted(changed)).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def is_toy_model(model: models.Model) -> bool:
  """Whether `model` holds the bundled toy's weights, whatever the spelling of its path (`toy`, a
  relative or absolute path, a copy): decided by the config and the weights' hash."""
  if model.path and os.path.realpath(model.path) == os.path.realpath(toy.TOY_MODEL_DIR):
    return True
  try:
    with open(os.path.join(toy.TOY_MODEL_DIR, models.pretrained.CONVERTED_CONFIG)) as f:
      toy_cfg = models.ModelConfig.from_dict(json.load(f))
  except (OSError, ValueError, models.ConfigError):
    return False
  return model.cfg == toy_cfg and model_hash(model) == model_hash(toy.load_toy())


def bos_id(model: models.Model) -> int:
  """The id prepended as BOS: the config's BOS, else its EOS (GPT-2), else 0."""
  c = model.cfg
  if c.bos_token_id is not None:
    return int(c.bos_token_id)
  if c.eos_token_id is not None:
    return int(c.eos_token_id)
  return 0


# ------------------------------------------------------------------------------------------- data


def dataset_hash(dataset: tasks.Dataset) -> str:
  """sha256 over the token ids, lengths and labels (identifies the exact examples)."""
  h = hashlib.sha256()
  for a in (dataset.clean, dataset.corrupted, dataset.lengths):
    h.update(np.ascontiguousarray(a).tobytes())
  for k in sorted(dataset.labels):
    h.update(k.encode())
    h.update(np.ascontiguousarray(dataset.labels[k]).tobytes())
  return h.hexdigest()


def _token_text(model: models.Model, i: int) -> str:
  try:
    return repr(model.tokenizer.decode([i]))
  except Exception:  # noqa: BLE001 - any tokenizer failure just loses the text
    return "?"


def warn_rare_answers(model: models.Model, dataset: tasks.Dataset, data: str) -> list:
  """Warn (one line) about answers the model ranks in no prompt's top-50 next tokens."""
  rare = answers.rarely_predicted_answers(model.cfg, model.params, dataset, k=ANSWER_TOP_K)
  if rare:
    n = len(answers.answer_sets(dataset))
    shown = ", ".join(f"{_token_text(model, a[0])} (id {a[0]}{', ...' if len(a) > 1 else ''})"
                      for a in rare[:5])
    more = f" and {len(rare) - 5} more" if len(rare) > 5 else ""
    warn(f"--data={data}: {len(rare)} of {n} answers are in no prompt's top-{ANSWER_TOP_K} "
         f"next tokens: {shown}{more}; the model may predict them tokenised differently (e.g. "
         f"with a leading space on the answer, or a trailing space on the prompt, which "
         f"byte-level and SentencePiece tokenizers merge differently), so the metric may measure "
         f"noise")
  return rare


def load_dataset(model: models.Model, model_name: str, task: str, data: str | None,
                 n_examples: int, prepend_bos: bool = True, seed: int = 0,
                 skip_bad_rows: bool = False, mib_split: str = "train") -> tasks.Dataset:
  """The task's prompt pairs: generated for `induction` (no CSV needed), else read from `--data` (a
  task CSV, or a local copy of an MIB dataset: `tasks.load_mib_task`, split `--mib_split`).

  Generated induction data depend on the model's weights, not on how `--model` was spelled: the
  bundled toy (however reached) gets `toy.induction_task_dataset`, any other model `make_induction`.
  A CSV's skipped rows (`skip_bad_rows`), fewer usable rows than `n_examples` and answers the model
  never predicts are warned about (one line each; the first two share one).
  """
  if n_examples is None or n_examples < 1:
    raise InputError(f"--n_examples={n_examples}: must be at least 1")
  if data and not os.path.isfile(data) and not (os.path.isdir(data) and tasks.is_mib_source(data)):
    raise InputError(f"--data={data}: no such file")
  if task == "induction" and not data:
    if is_toy_model(model):
      try:
        return toy.induction_task_dataset(n_examples, seed=seed)
      except toy.ToyDataError as e:
        raise InputError(str(e)) from None
    return tasks.make_induction(n_examples, 8, model.cfg.d_vocab, seed=seed,
                                bos_id=bos_id(model) if prepend_bos else None)
  if not data:
    raise InputError(f"--data (a CSV of prompt pairs) is required for --task={task}")
  if model.tokenizer is None:
    raise InputError(f"--model={model_name} has no tokenizer.json; it cannot read text CSVs "
                     f"(give one with --tokenizer=PATH: a tokenizer.json, or a directory holding "
                     f"one)")
  # the pad token filling corrupted prompts shorter than their clean ones (TransformerLens's)
  pad = tasks.pad_token_id_of(model.tokenizer, bos_id(model), config_dir=model.path)
  try:
    if tasks.is_mib_source(data):  # a local copy of MIB's data (a directory, JSON(L) or parquet)
      dataset = tasks.load_mib_task(task, data, model.tokenizer, n_examples=n_examples,
                                    split=mib_split, prepend_bos=prepend_bos,
                                    bos_id=bos_id(model) if prepend_bos else None,
                                    vocab_size=model.cfg.d_vocab, skip_bad_rows=skip_bad_rows,
                                    pad_token_id=pad)
    else:
      dataset = tasks.load_task(task, data, model.tokenizer, n_examples=n_examples,
                                prepend_bos=prepend_bos,
                                bos_id=bos_id(model) if prepend_bos else None,
                                vocab_size=model.cfg.d_vocab, skip_bad_rows=skip_bad_rows,
                                pad_token_id=pad)
  except tasks.TaskError as e:
    raise InputError(str(e).replace("skip_bad_rows=True (--skip_bad_rows)",
                                    "--skip_bad_rows")) from None
  n = len(dataset.clean)
  short = (f"--n_examples={n_examples} is more than the {n} usable rows of --data={data}; using "
           f"{n}") if n < n_examples else ""
  if dataset.skipped:
    warn(f"--skip_bad_rows: left out {dataset.skipped_summary}" + (f"; {short}" if short else ""))
  elif short:
    warn(short)
  if dataset.fitted:  # unequal token lengths load with EAP-IG/MIB semantics: say so once
    print(f"note: {' '.join(dataset.fitted_summary.split())}", file=sys.stderr, flush=True)
  warn_rare_answers(model, dataset, data)
  return dataset


# ------------------------------------------------------------------------- a circuit's provenance


def read_meta(path: str) -> dict:
  """The `meta` section of a graph.json ({} when absent or unreadable: loading the graph itself
  reports a broken file)."""
  try:
    with open(path) as f:
      meta = json.load(f).get("meta")
  except (OSError, ValueError, AttributeError):
    return {}
  return meta if isinstance(meta, dict) else {}


def check_model_hash(model: models.Model, model_name: str, meta: Mapping[str, Any], source: str,
                     force: bool) -> None:
  """Refuse a model whose weights differ from those `meta` records (warn instead with `force`)."""
  expected = meta.get("model_hash")
  if not expected:
    return
  got = model_hash(model)
  if got == expected:
    return
  message = (f"--model={model_name}: its weights (sha256 {got[:12]}) differ from those {source} "
             f"was found with ({expected[:12]}, in its meta)")
  if not force:
    raise InputError(f"{message}; pass --force to evaluate it anyway")
  warn(f"{message}; evaluating anyway (--force)")



def _usable(meta: Mapping[str, Any]) -> dict:
  """meta with `model` and `data` replaced by the absolute paths recorded beside them, if
  present."""
  view = dict(meta)
  if isinstance(meta.get("model_path"), str) and os.path.isdir(meta["model_path"]):
    view["model"] = meta["model_path"]
  if isinstance(meta.get("data_path"), str) and os.path.isfile(meta["data_path"]):
    view["data"] = meta["data_path"]
  return view


def _same(name: str, a: Any, b: Any) -> bool:
  if name in ("model", "data") and isinstance(a, str) and isinstance(b, str):
    if name == "model":
      a, b = resolve_model_path(a), resolve_model_path(b)
    return os.path.realpath(a) == os.path.realpath(b)
  return a == b


def settings_from_meta(meta: Mapping[str, Any], given: Mapping[str, Any],
                       defaults: Mapping[str, Any], source: str,
                       unwarned: Sequence[str] = ()) -> dict:
  """The value of each setting in `defaults`: `given[name]` when that is not None (a flag given on
  the command line), else as recorded in `meta` (how the circuit was found), else the default.
  Settings given with a value other than meta's are listed in one warning line, except those in
  `unwarned` (checked otherwise, as the model is by its hash)."""
  view = _usable(meta)
  out, overrides = {}, []
  for name, default in defaults.items():
    if given.get(name) is not None:
      out[name] = given[name]
      if name in view and name not in unwarned and not _same(name, out[name], view[name]):
        overrides.append(f"--{name}={out[name]} (meta: {view[name]})")
    else:
      out[name] = view.get(name, default)
  if overrides:
    warn(f"{', '.join(overrides)} override{'s' if len(overrides) == 1 else ''} how {source} "
         f"was found, as its meta records it")
  return out
