"""MIB's circuit-track tasks, read from a local copy of their datasets as MIB's `dataset.py` reads
them.

MIB (`hannamw/MIB-circuit-track`, `MIB_circuit_track/dataset.py`, `HFEAPDataset`) keeps its tasks on
the HF hub (`mib-bench/ioi`, `copycolors_mcqa`, `arithmetic_addition`, `arithmetic_subtraction`,
`arc_easy`, `arc_challenge`). A local copy is a `.jsonl`, `.json` or `.parquet` file of the split's
rows, or a directory holding `{split}.jsonl` / `{split}*.parquet` (at any depth, as the hub's
`data/train-00000-of-00001.parquet`). Each row becomes a clean/corrupted pair with one correct and
one incorrect answer token, scored by `logit_diff`, after MIB's filter:

- `ioi`: clean `prompt`, corrupted `s2_io_flip_counterfactual.prompt`; correct / incorrect
  ` {metadata.indirect_object}` / ` {metadata.subject}`; rows kept when IO, S and `random_c` (with
  a space) have equal token counts;
- `mcqa`, `arc-easy`, `arc-challenge`: clean `prompt`, corrupted `symbol_counterfactual.prompt`;
  correct / incorrect `choices.label[answerKey]` of each (no space); rows kept when both labels
  have equal token counts;
- `arithmetic-addition` / `-subtraction`: clean `prompt`, corrupted
  `random_counterfactual.prompt`; correct / incorrect `str(label)` of each; rows kept when both
  labels are one token, the counterfactual exists, `operator` is `+` / `-`.

Answers are the first token of each text, without special tokens, as MIB's `tokenizer(...)[0]`.
Clean and corrupted prompts of different token lengths load as MIB runs them (its filter keeps
them; EAP-IG's attribution and evaluation align positions by index under the clean attention
mask): the corrupted prompt is fitted to the clean length (`load_task`, `Dataset.fitted`).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from typing import Any

from jaxinterp.tasks.csv_io import from_rows
from jaxinterp.tasks.data import Dataset, TaskError
from jaxinterp.tasks.registry import ALIASES
from jaxinterp.tasks.tokenization import as_tokenizer, encode

MIB_TASKS = ("ioi", "mcqa", "arithmetic-addition", "arithmetic-subtraction", "arc-easy",
             "arc-challenge")
HF_NAMES = {"ioi": "ioi", "mcqa": "copycolors_mcqa", "arithmetic-addition": "arithmetic_addition",
            "arithmetic-subtraction": "arithmetic_subtraction", "arc-easy": "arc_easy",
            "arc-challenge": "arc_challenge"}
"""Each task's dataset on the HF hub, `mib-bench/{name}`."""
COUNTERFACTUALS = {"ioi": "s2_io_flip_counterfactual", "mcqa": "symbol_counterfactual",
                   "arc-easy": "symbol_counterfactual", "arc-challenge": "symbol_counterfactual",
                   "arithmetic-addition": "random_counterfactual",
                   "arithmetic-subtraction": "random_counterfactual"}
_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_mib_source(path) -> bool:
  """Whether `path` looks like a local copy of an MIB dataset (a directory, or a JSON(L) or parquet
  file) rather than a CSV."""
  path = os.fspath(path)
  return os.path.isdir(path) or path.lower().endswith(_SUFFIXES)


def _read_file(path: str) -> list[dict[str, Any]]:
  try:
    if path.lower().endswith(".parquet"):
      import pyarrow.parquet as pq
      return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
      if path.lower().endswith(".jsonl"):
        return [json.loads(line) for line in f if line.strip()]
      data = json.load(f)
  except ImportError:
    raise TaskError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
  except (OSError, ValueError) as e:
    raise TaskError(f"cannot read the MIB data {path}: {e}") from None
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
    raise TaskError(f"{path}: expected a JSON list of row objects")
  return data


def read_rows(source, split: str = "train", *, task: str | None = None) -> list[dict[str, Any]]:
  """The raw rows of a local copy of an MIB dataset split (see the module docstring). `task` (one
  of `MIB_TASKS`) only names, when `source` is missing, the hub dataset it should be a copy of."""
  source = os.fspath(source)
  if os.path.isfile(source):
    return _read_file(source)
  if not os.path.isdir(source):
    hub = f" (a local copy of the HF hub's mib-bench/{HF_NAMES[task]})" if task in HF_NAMES else ""
    raise TaskError(f"{source}: no such MIB data file or directory{hub}")
  found = sorted(p for suffix in _SUFFIXES
                 for p in glob.glob(os.path.join(source, "**", f"{split}*{suffix}"),
                                    recursive=True))
  if not found:
    raise TaskError(f"{source}: no file of the split {split!r} ({split}.jsonl, {split}*.parquet, "
                    f"... at any depth)")
  rows = []
  for p in found:
    rows.extend(_read_file(p))
  return rows


def _get(row: dict[str, Any], *keys):
  v: Any = row
  for k in keys:
    if not isinstance(v, dict) or k not in v:
      return None
    v = v[k]
  return v


def _choice(block) -> str | None:
  """`block["choices"]["label"][block["answerKey"]]` as a string, or None."""
  labels, key = _get(block, "choices", "label"), _get(block, "answerKey")
  if not isinstance(labels, list) or isinstance(key, bool) or not isinstance(key, int) or \
     not 0 <= key < len(labels):
    return None
  return str(labels[key])


def _answers(task: str, row: dict[str, Any], cf: str) -> tuple | None:
  """(clean prompt, corrupted prompt, correct text, incorrect text, texts that must match in token
  count) of a row, or None when the row lacks a field."""
  clean, corrupted = _get(row, "prompt"), _get(row, cf, "prompt")
  if task == "ioi":
    io_, s, c = (_get(row, "metadata", k) for k in ("indirect_object", "subject", "random_c"))
    if None in (io_, s, c):
      return None
    texts = (f" {io_}", f" {s}", f" {c}")
  elif task.startswith("arithmetic"):
    if _get(row, "label") is None or _get(row, cf, "label") is None:
      return None
    texts = (str(row["label"]), str(row[cf]["label"]))
  else:
    texts = (_choice(row), _choice(_get(row, cf) or {}))
    if None in texts:
      return None
  if not isinstance(clean, str) or not isinstance(corrupted, str):
    return None
  return clean, corrupted, texts[0], texts[1], texts


def mib_rows(task: str, rows: Iterable[dict[str, Any]], tokenizer,
             counterfactual: str | None = None) -> list[dict[str, Any]]:
  """MIB's rows as task-CSV rows (`clean`, `corrupted`, `correct_idx`, `incorrect_idx`), after
  MIB's filter (see the module docstring), in their order."""
  task = ALIASES.get(task, task)
  if task not in MIB_TASKS:
    raise TaskError(f"unknown MIB task {task!r}; MIB's tasks are {', '.join(MIB_TASKS)}")
  tokenizer = as_tokenizer(tokenizer)
  cf = counterfactual or COUNTERFACTUALS[task]
  operator = {"arithmetic-addition": "+", "arithmetic-subtraction": "-"}.get(task)
  picked = []
  for row in rows:
    if operator is not None and row.get("operator") != operator:
      continue
    got = _answers(task, row, cf)
    if got is not None:
      picked.append(got)
  out = []
  for clean, corrupted, _right, _wrong, texts in picked:
    ids = encode(tokenizer, list(texts))
    lengths = {len(i) for i in ids}
    if len(lengths) != 1 or 0 in lengths or (operator is not None and lengths != {1}):
      continue
    out.append({"clean": clean, "corrupted": corrupted, "correct_idx": ids[0][0],
                "incorrect_idx": ids[1][0]})
  return out


def load_mib_task(task: str, source, tokenizer, *, split: str = "train",
                  n_examples: int | None = None, counterfactual: str | None = None,
                  prepend_bos: bool = True, bos_id: int | None = None,
                  vocab_size: int | None = None, skip_bad_rows: bool = False,
                  pad_token_id: int | None = None) -> Dataset:
  """Load an MIB task from a local copy of its dataset, as MIB's `HFEAPDataset` reads it.

  Args:
    task: one of `MIB_TASKS` (`arc_easy`-style spellings accepted).
    source: a `.jsonl` / `.json` / `.parquet` file of rows, or a directory with the split's files.
    tokenizer: a `tokenizers.Tokenizer` or its path.
    split: which split's files to read from a directory.
    n_examples: the first `n_examples` rows after MIB's filter (its `head(n)`).
    counterfactual: the counterfactual column (MIB's `counterfactual_type`); default as MIB's.
    prepend_bos, bos_id, vocab_size, skip_bad_rows, pad_token_id: as `load_task` (a corrupted
      prompt of another token length than its clean one is fitted to the clean length).

  Returns:
    A `Dataset` of the task (`correct` / `incorrect` labels, `logit_diff` by default).
  """
  task = ALIASES.get(task, task)
  rows = mib_rows(task, read_rows(source, split, task=task), tokenizer, counterfactual)
  if n_examples is not None:
    rows = rows[:n_examples]
  if not rows:
    raise TaskError(f"{os.fspath(source)}: no row of the MIB task {task!r} passes MIB's filter")
  return from_rows(task, rows, tokenizer, prepend_bos=prepend_bos, bos_id=bos_id,
                   vocab_size=vocab_size, source=f"{os.fspath(source)} ({split})",
                   skip_bad_rows=skip_bad_rows, pad_token_id=pad_token_id)
