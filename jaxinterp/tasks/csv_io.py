"""Task CSVs: reading and writing the EAP-IG format, parsing and checking each task's label columns,
and building a tokenised `Dataset` from the rows (`load_task` from a file, `from_rows` from memory).

Every bad input raises `TaskError` with the file, row and column at fault.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from jaxinterp.tasks.data import Dataset, TaskError
from jaxinterp.tasks.registry import get_task
from jaxinterp.tasks.tokenization import (as_tokenizer, encode, find_bos_id, sva_verb_ids,
                                          vocab_size_of, year_token_ids)

# ----------------------------------------------------------------------------------------------------
# Label parsing


@dataclasses.dataclass
class _Row:
  index: int   # 0-based data row
  line: int    # line of the file where the row ends (1-based), 0 for generated rows
  values: Dict[str, Any]


@dataclasses.dataclass
class _Ctx:
  source: str
  tokenizer: Any
  vocab_size: Optional[int]

  def where(self, row: _Row, column: Optional[str] = None) -> str:
    s = f"{self.source}: row {row.index}"
    if row.line:
      s += f" (line {row.line})"
    if column:
      s += f", column {column!r}"
    return s


def _cell(ctx: _Ctx, row: _Row, col: str) -> str:
  v = row.values.get(col)
  if v is None:
    raise TaskError(f"{ctx.where(row, col)}: value is missing (the row has too few fields)")
  return v if isinstance(v, str) else str(v)


def _check_id(ctx: _Ctx, row: _Row, col: str, i: int) -> int:
  if i < 0:
    raise TaskError(f"{ctx.where(row, col)}: token id {i} is negative")
  if i >= 2**31 or (ctx.vocab_size is not None and i >= ctx.vocab_size):
    raise TaskError(f"{ctx.where(row, col)}: token id {i} is outside the vocabulary "
                    f"(size {ctx.vocab_size if ctx.vocab_size is not None else 2**31})")
  return i


def _parse_int(ctx: _Ctx, row: _Row, col: str) -> int:
  v = row.values.get(col)
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return int(v)
  s = _cell(ctx, row, col).strip()
  try:
    return int(s)
  except ValueError:
    try:
      f = float(s)
    except ValueError:
      f = math.nan
    if math.isfinite(f) and f == int(f):
      return int(f)
    raise TaskError(f"{ctx.where(row, col)}: expected an integer, got {s[:60]!r}") from None


def _parse_id(ctx: _Ctx, row: _Row, col: str) -> int:
  return _check_id(ctx, row, col, _parse_int(ctx, row, col))


def _parse_id_set(ctx: _Ctx, row: _Row, col: str) -> List[int]:
  """A JSON list of token ids (or one bare id) -> non-empty list of in-vocabulary ids."""
  v = row.values.get(col)
  if isinstance(v, (list, tuple, np.ndarray)):
    items = list(v)
  else:
    s = _cell(ctx, row, col).strip()
    try:
      items = json.loads(s)
    except (ValueError, RecursionError):
      raise TaskError(f"{ctx.where(row, col)}: expected a token id or a JSON list of ids such as "
                      f"[16840, 23685], got {s[:60]!r}") from None
    if not isinstance(items, list):
      items = [items]
  if not items:
    raise TaskError(f"{ctx.where(row, col)}: the answer set is empty")
  out = []
  for x in items:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
      raise TaskError(f"{ctx.where(row, col)}: answer ids must be integers, got {str(x)[:40]!r}")
    out.append(_check_id(ctx, row, col, int(x)))
  return out


def _pad_sets(sets: List[List[int]]) -> np.ndarray:
  k = max(len(s) for s in sets)
  out = np.full((len(sets), k), -1, np.int32)
  for i, s in enumerate(sets):
    out[i, :len(s)] = s
  return out


def _ids(values: List[int]) -> np.ndarray:
  return np.asarray(values, np.int64).astype(np.int32)


# Per task: required columns (each a tuple of accepted names, first found wins), optional columns,
# and a builder of the labels dict from the rows.
_Spec = Tuple[Tuple[Tuple[str, ...], ...], Tuple[str, ...], Callable]


def _col(names: Tuple[str, ...], header: Sequence[str]) -> Optional[str]:
  return next((c for c in names if c in header), None)


def _labels_pair(correct: Tuple[str, ...], incorrect: Tuple[str, ...], sets: bool = False):
  def build(ctx: _Ctx, rows: List[_Row], header: Sequence[str]) -> Dict[str, np.ndarray]:
    c, i = _col(correct, header), _col(incorrect, header)
    if sets:
      return {"correct": _pad_sets([_parse_id_set(ctx, r, c) for r in rows]),
              "incorrect": _pad_sets([_parse_id_set(ctx, r, i) for r in rows])}
    return {"correct": _ids([_parse_id(ctx, r, c) for r in rows]),
            "incorrect": _ids([_parse_id(ctx, r, i) for r in rows])}
  return build


def _labels_logit_diff(ctx, rows, header):
  """Ids or JSON sets; plain ids stay [N] vectors when every row holds exactly one."""
  c = _pad_sets([_parse_id_set(ctx, r, "correct_idx") for r in rows])
  i = _pad_sets([_parse_id_set(ctx, r, "incorrect_idx") for r in rows])
  return {"correct": c[:, 0] if c.shape[1] == 1 else c, "incorrect": i[:, 0] if i.shape[1] == 1 else i}


def _labels_greater_than(ctx, rows, header):
  years = []
  for r in rows:
    y = _parse_int(ctx, r, "correct_idx")
    if not 0 <= y <= 99:
      raise TaskError(f"{ctx.where(r, 'correct_idx')}: expected a two-digit year 0..99, got {y}")
    years.append(y)
  year_ids = year_token_ids(ctx.tokenizer)
  for j, t in enumerate(year_ids):
    if ctx.vocab_size is not None and t >= ctx.vocab_size:
      raise TaskError(f"{ctx.source}: year token {j:02d} has id {t}, outside the vocabulary "
                      f"(size {ctx.vocab_size})")
  return {"threshold": _ids(years), "year_ids": np.tile(year_ids[None, :], (len(rows), 1))}


def _labels_sva(ctx, rows, header):
  plural = []
  for r in rows:
    p = _parse_int(ctx, r, "plural")
    if p not in (0, 1):
      raise TaskError(f"{ctx.where(r, 'plural')}: expected 0 (singular) or 1 (plural), got {p}")
    plural.append(p)
  if ("singular_idx" in header) != ("plural_idx" in header):
    raise TaskError(f"{ctx.source}: sva needs both 'singular_idx' and 'plural_idx' columns, or neither")
  if "singular_idx" in header:
    sing = [_parse_id_set(ctx, r, "singular_idx") for r in rows]
    plur = [_parse_id_set(ctx, r, "plural_idx") for r in rows]
  else:
    s, p = sva_verb_ids(ctx.tokenizer)
    for name, ids in (("singular", s), ("plural", p)):
      if ctx.vocab_size is not None and ids.max() >= ctx.vocab_size:
        raise TaskError(f"{ctx.source}: built-in {name} verb id {int(ids.max())} is outside the "
                        f"vocabulary (size {ctx.vocab_size})")
    sing = [list(s)] * len(rows)
    plur = [list(p)] * len(rows)
  correct = [pl if f else sg for f, sg, pl in zip(plural, sing, plur)]
  wrong = [sg if f else pl for f, sg, pl in zip(plural, sing, plur)]
  return {"correct": _pad_sets(correct), "incorrect": _pad_sets(wrong), "plural": _ids(plural)}


def _labels_country(ctx, rows, header):
  c = _col(("country_idx", "answer_idx"), header)
  i = _col(("corrupted_country_idx", "corrupted_answer_idx"), header)
  correct = _ids([_parse_id(ctx, r, c) for r in rows])
  if i is None:
    wrong = np.full(len(rows), -1, np.int32)
  else:
    vals = []
    for r in rows:
      s = str(r.values.get(i) or "").strip()
      vals.append(-1 if s in ("", "-1") else _parse_id(ctx, r, i))
    wrong = _ids(vals)
  return {"correct": correct, "incorrect": wrong}


def _labels_induction(ctx, rows, header):
  return {"target": _ids([_parse_id(ctx, r, "target") for r in rows])}


_SPECS: Dict[str, _Spec] = {
    "ioi": ((("correct_idx",), ("incorrect_idx",)), (),
            _labels_pair(("correct_idx",), ("incorrect_idx",))),
    "greater-than": ((("correct_idx",),), (), _labels_greater_than),
    "gender-bias": ((("clean_answer_idx",), ("corrupted_answer_idx",)), (),
                    _labels_pair(("clean_answer_idx",), ("corrupted_answer_idx",))),
    "sva": ((("plural",),), ("singular_idx", "plural_idx"), _labels_sva),
    "country-capital": ((("country_idx", "answer_idx"),), ("corrupted_country_idx",), _labels_country),
    "hypernymy": ((("answers_idx",), ("corrupted_answers_idx",)), (),
                  _labels_pair(("answers_idx",), ("corrupted_answers_idx",), sets=True)),
    "logit-diff": ((("correct_idx",), ("incorrect_idx",)), (), _labels_logit_diff),
    "induction": ((("target",),), (), _labels_induction),
}


# ----------------------------------------------------------------------------------------------------
# Building datasets


def _build(name: str, rows: List[_Row], header: Sequence[str], tokenizer, *, source: str,
           prepend_bos: bool, bos_id: Optional[int], vocab_size: Optional[int]) -> Dataset:
  task = get_task(name)
  required, _, build_labels = _SPECS[name]
  missing = [c for c in ("clean", "corrupted") if c not in header]
  missing += ["|".join(alts) for alts in required if _col(alts, header) is None]
  if missing:
    raise TaskError(f"{source}: task {name!r} needs column(s) {', '.join(missing)} which are missing; "
                    f"the file has columns {list(header)}")
  if not rows:
    raise TaskError(f"{source}: no data rows")
  tokenizer = as_tokenizer(tokenizer)
  if vocab_size is None:
    vocab_size = vocab_size_of(tokenizer)
  ctx = _Ctx(source, tokenizer, vocab_size)
  if prepend_bos:
    if bos_id is None:
      bos_id = find_bos_id(tokenizer)
      if bos_id is None:
        raise TaskError("cannot find the tokenizer's BOS token; pass bos_id= or prepend_bos=False")
    if bos_id < 0 or (vocab_size is not None and bos_id >= vocab_size):
      raise TaskError(f"bos_id {bos_id} is outside the vocabulary (size {vocab_size})")
  else:
    bos_id = None

  texts = {}
  for col in ("clean", "corrupted"):
    for r in rows:
      _cell(ctx, r, col)
    texts[col] = encode(tokenizer, [_cell(ctx, r, col) for r in rows])
  lengths = []
  for r, c, k in zip(rows, texts["clean"], texts["corrupted"]):
    if not c or not k:
      col = "clean" if not c else "corrupted"
      raise TaskError(f"{ctx.where(r, col)}: the prompt is empty (no tokens)")
    if len(c) != len(k):
      raise TaskError(
          f"{ctx.where(r)}: clean and corrupted prompts tokenise to different lengths ({len(c)} vs "
          f"{len(k)} tokens); patching needs aligned positions. clean={_cell(ctx, r, 'clean')[:80]!r} "
          f"corrupted={_cell(ctx, r, 'corrupted')[:80]!r}")
    if vocab_size is not None:
      for col, ids in (("clean", c), ("corrupted", k)):
        if max(ids) >= vocab_size or min(ids) < 0:
          bad = max(ids) if max(ids) >= vocab_size else min(ids)
          raise TaskError(f"{ctx.where(r, col)}: token id {bad} is outside the vocabulary "
                          f"(size {vocab_size})")
    lengths.append(len(c) + (bos_id is not None))
  labels = build_labels(ctx, rows, header)

  pad_id = bos_id if bos_id is not None else 0
  n, width = len(rows), max(lengths)
  clean = np.full((n, width), pad_id, np.int32)
  corrupted = np.full((n, width), pad_id, np.int32)
  off = 1 if bos_id is not None else 0
  for j, (c, k) in enumerate(zip(texts["clean"], texts["corrupted"])):
    if off:
      clean[j, 0] = corrupted[j, 0] = bos_id
    clean[j, off:off + len(c)] = c
    corrupted[j, off:off + len(k)] = k
  return Dataset(task=task, clean=clean, corrupted=corrupted, lengths=np.asarray(lengths, np.int32),
                 labels=labels, pad_id=int(pad_id), bos_id=bos_id, source=source)


def _read_csv(csv_path) -> Tuple[List[str], List[_Row]]:
  path = os.fspath(csv_path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise TaskError(f"cannot read {path}: {e.strerror or e}") from None
  if not raw.strip():
    raise TaskError(f"{path}: the file is empty")
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise TaskError(f"{path}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                    f"save the CSV as UTF-8") from None
  if "\x00" in text:
    raise TaskError(f"{path}: contains NUL bytes; not a text CSV")
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = next(reader)
    header = [h.strip() for h in header]
    rows = []
    for i, rec in enumerate(reader):
      if not rec or all(not x.strip() for x in rec):
        continue  # blank line
      values = {h: v for h, v in zip(header, rec) if h}
      rows.append(_Row(len(rows), reader.line_num, values))
  except csv.Error as e:
    raise TaskError(f"{path}: malformed CSV near line {reader.line_num}: {e}") from None
  return header, rows


def load_task(name: str, csv_path, tokenizer, *, n_examples: Optional[int] = None,
              prepend_bos: bool = True, bos_id: Optional[int] = None,
              vocab_size: Optional[int] = None) -> Dataset:
  """Load a task CSV (EAP-IG format) and tokenise it.

  Args:
    name: a registered task (see the module docstring for each task's columns).
    csv_path: the CSV file (UTF-8, header row).
    tokenizer: a `tokenizers.Tokenizer`, or the path of a `tokenizer.json` (or of its directory).
    n_examples: keep only the first `n_examples` rows (as the reference's `head(n)`).
    prepend_bos: prepend BOS to every prompt (TransformerLens' default, used by the EAP-IG results).
    bos_id: the BOS id; by default the token the tokenizer's post-processor prepends, else a
      well-known BOS token in its vocabulary (`<|endoftext|>` = 50256 for GPT-2).
    vocab_size: the model's vocabulary size; every prompt and label id must be below it. Defaults to
      the tokenizer's vocabulary size.

  Returns:
    A `Dataset` of int32 arrays, right padded, with `lengths` counting BOS.
  """
  get_task(name)
  if n_examples is not None and (not isinstance(n_examples, (int, np.integer)) or n_examples <= 0):
    raise TaskError(f"n_examples must be a positive integer, got {n_examples!r}")
  header, rows = _read_csv(csv_path)
  if n_examples is not None:
    rows = rows[:n_examples]
  return _build(name, rows, header, tokenizer, source=os.fspath(csv_path), prepend_bos=prepend_bos,
                bos_id=bos_id, vocab_size=vocab_size)


def from_rows(name: str, rows: Sequence[Dict[str, Any]], tokenizer, *, prepend_bos: bool = True,
              bos_id: Optional[int] = None, vocab_size: Optional[int] = None,
              source: str = "<rows>") -> Dataset:
  """Like `load_task`, from in-memory rows (dicts with the CSV's columns; ids may be ints or lists)."""
  get_task(name)
  rows = list(rows)
  header = list(rows[0].keys()) if rows else ["clean", "corrupted"]
  wrapped = [_Row(i, 0, {k: v for k, v in r.items()}) for i, r in enumerate(rows)]
  return _build(name, wrapped, header, tokenizer, source=source, prepend_bos=prepend_bos,
                bos_id=bos_id, vocab_size=vocab_size)


def write_csv(rows: Sequence[Dict[str, Any]], path) -> None:
  """Write rows (e.g. from `ioi_rows`) as a task CSV, atomically (temp file, then rename)."""
  rows = list(rows)
  if not rows:
    raise TaskError("write_csv: no rows")
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  fields = list(rows[0].keys())
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: json.dumps(list(map(int, v))) if isinstance(v, (list, tuple, np.ndarray)) else v
                  for k, v in r.items()})
  os.replace(tmp, path)
