"""RASP programs as circuit-discovery tasks: compiling them with tracr, tracr's library programs,
and clean/corrupted data with a metric on the program's output.

tracr is an optional dependency (`pip install "jaxinterp[tracr]"`): it is imported inside the
functions that need it, never when this module is imported, and `require_tracr` says how to install
it. Compilation errors are `ProgramError`s with tracr's own message on one line.

The task, `OUTPUT_VALUE`, reads the model's output at one position: `logits[target]`, the
output-space value of the clean run's output there (for a categorical output, the one-hot direction
of the clean answer: 1 on the clean run, near 0 once the computation is broken; for a numerical
output, the value itself, `target = 0`). `make_dataset` samples clean and corrupted inputs
independently and uniformly from the vocabulary (all of length `max_seq_len`, BOS first) and reads
the metric at a chosen position, or at every position (one row per example and position, so the
attribution's mean over rows is the mean over positions).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models import tracr as T
from jaxinterp.tasks import Dataset, Task, metrics

COMPILER_BOS = "BOS"
INSTALL_HINT = 'tracr is not installed: pip install "jaxinterp[tracr]" (tracr-pypi and dm-haiku)'


class ProgramError(ValueError):
  """A RASP program that cannot be loaded or compiled, or a vocabulary it cannot encode."""


def require_tracr() -> None:
  """Raise ProgramError with the install command if tracr (or haiku) is not importable."""
  for module in ("tracr", "haiku"):
    if importlib.util.find_spec(module) is None:
      raise ProgramError(INSTALL_HINT)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if isinstance(e, (ValueError, NotImplementedError)) else f"{type(e).__name__}: {text}"


# ----------------------------------------------------------------------------- loading, compiling


def parse_vocab(text: str) -> list:
  """`"0,1,2,3"` -> `[0, 1, 2, 3]`: comma-separated values, integers read as ints, others kept as
  strings (spaces around each value stripped). ProgramError if empty or repeated."""
  values = []
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    try:
      values.append(int(item))
    except ValueError:
      values.append(item)
  if not values:
    raise ProgramError("the vocabulary is empty; give comma-separated values, e.g. --vocab=0,1,2,3")
  dup = sorted({repr(v) for v in values if values.count(v) > 1})
  if dup:
    raise ProgramError(f"vocabulary values repeated: {', '.join(dup)}")
  return values


def load_program(spec: str) -> Callable[[], Any]:
  """The function named by `FILE.py:FUNCTION` (it takes no arguments and returns the output SOp)."""
  path, sep, name = (spec or "").rpartition(":")
  if not sep or not path or not name:
    raise ProgramError(f"{spec!r}: expected FILE.py:FUNCTION")
  if not os.path.isfile(path):
    raise ProgramError(f"{path}: no such file")
  mod_spec = importlib.util.spec_from_file_location(f"_rasp_program_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except Exception as e:  # the user's file: report whatever it raised, on one line
    raise ProgramError(f"{path}: cannot be imported: {type(e).__name__}: "
                       f"{' '.join(str(e).split())}") from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ProgramError(f"{path} has no function {name!r}")
  return fn


def build_program(fn: Callable[[], Any], name: str = "program"):
  """`fn()`, checked to be a RASP SOp."""
  from tracr.rasp import rasp
  try:
    program = fn()
  except Exception as e:
    raise ProgramError(f"{name}() raised {type(e).__name__}: {' '.join(str(e).split())}") from None
  if not isinstance(program, rasp.SOp):
    raise ProgramError(f"{name}() must return a RASP SOp, got {type(program).__name__}")
  return program


def check_vocab(program, vocab: Sequence) -> None:
  """ProgramError naming the first vocabulary value the program cannot evaluate (e.g. a Map whose
  function is not defined there), or BOS used as a value."""
  from tracr.rasp import rasp
  if COMPILER_BOS in vocab:
    raise ProgramError(f"vocabulary value {COMPILER_BOS!r} is the compiler's BOS token")
  for v in vocab:
    try:
      rasp.evaluate(program, [v])
    except Exception as e:
      raise ProgramError(f"vocabulary value {v!r} is outside the program's encoding: evaluating "
                         f"the program on [{v!r}] raised {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None


def compile_program(program, vocab: Sequence, max_seq_len: int, causal: bool = False):
  """tracr's `compile_rasp_to_model` (BOS = "BOS"); ProgramError with tracr's message otherwise.

  When compilation fails and a vocabulary value is the cause (the program cannot evaluate it), the
  error names that value instead.
  """
  require_tracr()
  from tracr.compiler import compiling
  if not isinstance(max_seq_len, int) or max_seq_len < 1:
    raise ProgramError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
  try:
    assembled = compiling.compile_rasp_to_model(program, vocab=set(vocab), max_seq_len=max_seq_len,
                                                causal=causal, compiler_bos=COMPILER_BOS)
  except Exception as e:  # tracr raises many types; its message is what the user needs
    check_vocab(program, vocab)
    raise ProgramError(f"tracr cannot compile the program: {_one_line(e)}") from None
  missing = [v for v in vocab if v not in assembled.input_encoder.encoding_map]
  if missing:
    raise ProgramError(f"vocabulary value {missing[0]!r} is outside the program's encoding "
                       f"{sorted(assembled.input_encoder.encoding_map, key=repr)}")
  return assembled


# ------------------------------------------------------------------------------------ the library


@dataclasses.dataclass(frozen=True)
class LibraryProgram:
  """A program of tracr's library with the vocabulary and length it is benchmarked at.

  Attributes:
    name: the benchmark's name for it.
    make: `max_seq_len -> output SOp` (imports tracr when called).
    vocab: the input values.
    max_seq_len: inputs have this many values (BOS not counted).
    description: one line.
  """

  name: str
  make: Callable[[int], Any]
  vocab: tuple
  max_seq_len: int
  description: str


def _lib():
  from tracr.compiler import lib
  from tracr.rasp import rasp
  return lib, rasp


def _reverse(n):
  lib, rasp = _lib()
  return lib.make_reverse(rasp.tokens)


def _frac_prevs(n):
  lib, rasp = _lib()
  return lib.make_frac_prevs(rasp.tokens == "x")


def _sort(n):
  lib, rasp = _lib()
  return lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=n, min_key=1)


def _hist(n):
  lib, _ = _lib()
  return lib.make_hist()


def _sort_freq(n):
  lib, _ = _lib()
  return lib.make_sort_freq(n)


def _pair_balance(n):
  lib, rasp = _lib()
  return lib.make_pair_balance(rasp.tokens, "(", ")")


LIBRARY: dict[str, LibraryProgram] = {p.name: p for p in (
    LibraryProgram("reverse", _reverse, (1, 2, 3), 5, "the input reversed (ACDC's tracr-reverse)"),
    LibraryProgram("frac_prevs", _frac_prevs, ("x", "y", "z"), 5,
                   "fraction of tokens so far that are 'x' (ACDC's tracr-proportion; numerical)"),
    LibraryProgram("sort", _sort, (1, 2, 3, 4, 5), 5, "the input sorted (keys made unique)"),
    LibraryProgram("hist", _hist, ("a", "b", "c", "d"), 5, "how often each token occurs"),
    LibraryProgram("sort_freq", _sort_freq, ("a", "b", "c"), 5, "tokens sorted by frequency"),
    LibraryProgram("pair_balance", _pair_balance, ("(", ")"), 5,
                   "fraction of '(' minus fraction of ')' so far (numerical)"),
)}
# Not in the set: shuffle_dyck / shuffle_dyck2. Their output ("is the prefix balanced?") is False on
# nearly every uniformly sampled input, in the clean and the corrupted run alike, so no ablation
# moves the metric; they need an input distribution of their own.


# ---------------------------------------------------------------------------------- task and data


def _output_value(logits, batch, clean_logits):
  out = metrics.last_logits(logits, batch.last)
  return jnp.take_along_axis(out, batch.labels["target"].astype(jnp.int32)[:, None], -1)[:, 0]


OUTPUT_VALUE = Task("output-value", _output_value,
                    description="logits[target] at the read position: the output-space value of "
                                "the clean run's output (a numerical output's value)")


def make_dataset(model: T.TracrModel, n: int, seed: int = 0,
                 position: int | None = None) -> Dataset:
  """Clean/corrupted pairs for a ported tracr model, with the `OUTPUT_VALUE` metric.

  Args:
    model: `models.from_tracr(...)`.
    n: examples (input pairs); each is read at one position or at every position.
    seed: numpy seed; the same seed gives the same data.
    position: the 0-based index of the output read (BOS not counted), or None for every position
      (then the dataset has `n * max_seq_len` rows, example-major).

  Returns:
    A `Dataset`: inputs of `max_seq_len` values drawn uniformly (clean and corrupted independently),
    BOS first; labels `target` (the clean output's logit index, 0 for a numerical output);
    `read_at` the model position read (`position + 1`).
  """
  enc = model.encoding
  L = enc.max_seq_len
  if not isinstance(n, int) or n < 1:
    raise ProgramError(f"n must be a positive integer, got {n!r}")
  if position is not None and not 0 <= position < L:
    raise ProgramError(f"position {position} is outside the output positions 0..{L - 1}")
  ids = np.asarray(sorted(enc.vocab_ids.values()), np.int32)
  rng = np.random.default_rng(seed)
  bos = np.full((n, 1), enc.bos_id, np.int32)
  clean = np.concatenate([bos, rng.choice(ids, (n, L))], 1).astype(np.int32)
  corrupted = np.concatenate([bos, rng.choice(ids, (n, L))], 1).astype(np.int32)
  logits = np.asarray(jax.jit(model.forward)(model.params, clean))  # [n, L + 1, out]
  read = np.arange(1, L + 1) if position is None else np.asarray([position + 1])
  rows = np.repeat(np.arange(n), read.size)
  at = np.tile(read, n).astype(np.int32)
  target = (np.argmax(logits[rows, at], -1) if enc.categorical else np.zeros(rows.size))
  where = "every position" if position is None else f"position {position}"
  return Dataset(task=OUTPUT_VALUE, clean=clean[rows], corrupted=corrupted[rows],
                 lengths=np.full(rows.size, L + 1, np.int32),
                 labels={"target": target.astype(np.int32)}, pad_id=enc.pad_id, bos_id=enc.bos_id,
                 source=f"tracr inputs (n={n}, seed={seed}, {where})", read_at=at)


def decode_inputs(model: T.TracrModel, ids: np.ndarray) -> list[list]:
  """The input values of token-id rows (BOS dropped)."""
  vals = model.encoding.input_values
  return [[vals[i] for i in row[1:]] for row in np.asarray(ids)]


def rasp_agreement(program, model: T.TracrModel, dataset: Dataset, limit: int = 64) -> float:
  """Fraction of the dataset's read outputs (first `limit` rows) where the compiled model's decoded
  output equals the RASP program's own (numerical: within 1e-3). tracr's MLPs are approximate."""
  from tracr.rasp import rasp
  rows = min(limit, len(dataset))
  logits = np.asarray(jax.jit(model.forward)(model.params, dataset.clean[:rows]))
  ok = 0
  for i, values in enumerate(decode_inputs(model, dataset.clean[:rows])):
    p = int(dataset.read_at[i]) if dataset.read_at is not None else len(values)
    want = rasp.evaluate(program, values)[p - 1]
    got = model.encoding.decode(logits[i, p:p + 1])[0]
    if model.encoding.categorical:
      ok += got == want
    else:
      ok += want is not None and abs(float(got) - float(want)) < 1e-3
  return ok / rows


def warn_disagreement(name: str, agreement: float) -> None:
  """One warning line on stderr when the compiled model disagrees with its RASP program on some of
  the checked outputs (`rasp_agreement` < 1): its true circuit then computes something else than
  the program on those inputs, so recovery is measured against the model, not the program."""
  if agreement < 1:
    print(f"warning: {name}: the compiled model's output equals the RASP program's on "
          f"{agreement:.1%} of the checked outputs (rasp_agreement {agreement:.3f} < 1; tracr's "
          f"MLPs approximate numerical and categorical maps); the truth and the AUROCs are the "
          f"compiled model's", file=sys.stderr, flush=True)
