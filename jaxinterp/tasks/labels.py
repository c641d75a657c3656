"""Task labels: parsing and checking each task's label columns of a CSV row (ids, id sets, years,
SVA verb numbers), the table of each task's columns (`SPECS`), and which task a header fits.

`csv_io` reads files and builds datasets with these; every problem of one row raises `RowError`
(a `TaskError` naming the file, row and column) so that bad rows can be listed or skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxinterp.tasks.data import TaskError
from jaxinterp.tasks.tokenization import VERB_LIST, sva_verb_ids, sva_verb_sets, year_token_ids


@dataclasses.dataclass
class Row:
  """One data row: its index, the file line where it ends, and its values by column.

  Messages name a file's row by its line (`label`: "line 4", what an editor shows) and an
  in-memory row by its 0-based index ("row 2"), the same way in every message.
  """

  index: int   # 0-based data row
  line: int    # line of the file where the row ends (1-based), 0 for generated rows
  values: dict[str, Any]
  n_fields: int | None = None  # fields the file's record has (None: in-memory rows)

  @property
  def label(self) -> str:
    """"line 4" for a file's row, "row 2" for an in-memory one."""
    return f"line {self.line}" if self.line else f"row {self.index}"


class RowError(TaskError):
  """A problem of one row (the row can be skipped); `kind` groups rows in the summary."""

  def __init__(self, message: str, kind: str):
    super().__init__(message)
    self.kind = kind


BAD_LABEL = "a malformed label"
FIELD_COUNT = "a field count that does not match the header"
OUT_OF_VOCAB = "a token id outside the vocabulary"
LISTED = 20  # rows named per kind of problem in a summary


@dataclasses.dataclass
class Ctx:
  """What label parsing needs to know: the source (for messages), tokenizer and vocabulary size."""

  source: str
  tokenizer: Any
  vocab_size: int | None
  sva_verbs: str | None = None  # the paper's SVA verb list, if given
  warned: set[str] = dataclasses.field(default_factory=set)  # warnings given (one line per load)

  def where(self, row: Row, column: str | None = None) -> str:
    """"file: line n, column 'c'" (in-memory rows: "row i") for messages (`Row.label`)."""
    s = f"{self.source}: {row.label}"
    if column:
      s += f", column {column!r}"
    return s

  def error(self, row: Row, column: str | None, kind: str, detail: str) -> RowError:
    """A `RowError` of `kind` at the row and column."""
    return RowError(f"{self.where(row, column)}: {detail}", kind)


def cell(ctx: Ctx, row: Row, col: str) -> str:
  """The row's value in column `col` as text; a `RowError` if it is missing."""
  v = row.values.get(col)
  if v is None:
    raise ctx.error(row, col, "a missing value", "value is missing (the row has too few fields)")
  return v if isinstance(v, str) else str(v)


def _check_id(ctx: Ctx, row: Row, col: str, i: int) -> int:
  if i < 0:
    raise ctx.error(row, col, OUT_OF_VOCAB, f"token id {i} is negative")
  if i >= 2**31 or (ctx.vocab_size is not None and i >= ctx.vocab_size):
    raise ctx.error(row, col, OUT_OF_VOCAB, f"token id {i} is outside the vocabulary "
                    f"(size {ctx.vocab_size if ctx.vocab_size is not None else 2**31})")
  return i


def _parse_int(ctx: Ctx, row: Row, col: str) -> int:
  v = row.values.get(col)
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return int(v)
  s = cell(ctx, row, col).strip()
  try:
    return int(s)
  except ValueError:
    try:
      f = float(s)
    except ValueError:
      f = math.nan
    if math.isfinite(f) and f == int(f):
      return int(f)
    raise ctx.error(row, col, BAD_LABEL, f"expected an integer, got {s[:60]!r}") from None


def _parse_id(ctx: Ctx, row: Row, col: str) -> int:
  return _check_id(ctx, row, col, _parse_int(ctx, row, col))


def _parse_id_set(ctx: Ctx, row: Row, col: str) -> list[int]:
  """A JSON list of token ids (or one bare id) -> non-empty list of in-vocabulary ids."""
  v = row.values.get(col)
  if isinstance(v, (list, tuple, np.ndarray)):
    items = list(v)
  else:
    s = cell(ctx, row, col).strip()
    try:
      items = json.loads(s)
    except (ValueError, RecursionError):
      raise ctx.error(row, col, BAD_LABEL, f"expected a token id or a JSON list of ids such as "
                      f"[16840, 23685], got {s[:60]!r}") from None
    if not isinstance(items, list):
      items = [items]
  if not items:
    raise ctx.error(row, col, BAD_LABEL, "the answer set is empty")
  out = []
  for x in items:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
      raise ctx.error(row, col, BAD_LABEL, f"answer ids must be integers, got {str(x)[:40]!r}")
    out.append(_check_id(ctx, row, col, int(x)))
  return out


def _pad_sets(sets: list[list[int]]) -> np.ndarray:
  k = max(len(s) for s in sets)
  out = np.full((len(sets), k), -1, np.int32)
  for i, s in enumerate(sets):
    out[i, :len(s)] = s
  return out


def _ids(values: list[int]) -> np.ndarray:
  return np.asarray(values, np.int64).astype(np.int32)


# Per task: required columns (each a tuple of accepted names, first found wins), optional columns,
# and a builder of the labels dict from the rows.
Spec = tuple[tuple[tuple[str, ...], ...], tuple[str, ...], Callable]


def col(names: tuple[str, ...], header: Sequence[str]) -> str | None:
  """The first of the accepted column `names` the header has, or None."""
  return next((c for c in names if c in header), None)


def _labels_pair(correct: tuple[str, ...], incorrect: tuple[str, ...], sets: bool = False):
  def build(ctx: Ctx, rows: list[Row], header: Sequence[str]) -> dict[str, np.ndarray]:
    c, i = col(correct, header), col(incorrect, header)
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
  return {"correct": c[:, 0] if c.shape[1] == 1 else c,
          "incorrect": i[:, 0] if i.shape[1] == 1 else i}


def _labels_greater_than(ctx, rows, header):
  years = []
  for r in rows:
    y = _parse_int(ctx, r, "correct_idx")
    if not 0 <= y <= 99:
      raise ctx.error(r, "correct_idx", BAD_LABEL, f"expected a two-digit year 0..99, got {y}")
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
      raise ctx.error(r, "plural", BAD_LABEL, f"expected 0 (singular) or 1 (plural), got {p}")
    plural.append(p)
  if ("singular_idx" in header) != ("plural_idx" in header):
    raise TaskError(f"{ctx.source}: sva needs both 'singular_idx' and 'plural_idx' columns, or "
                    "neither")
  if "singular_idx" in header:
    sing = [_parse_id_set(ctx, r, "singular_idx") for r in rows]
    plur = [_parse_id_set(ctx, r, "plural_idx") for r in rows]
  else:
    verbs = _verb_list(ctx)
    if verbs:  # the paper's verb sets (its ids scanned below the vocabulary size)
      s, p = sva_verb_sets(verbs, ctx.tokenizer, ctx.vocab_size)
    else:
      s, p = sva_verb_ids(ctx.tokenizer)
      _warn_builtin_verbs(ctx, len(s))
    for name, ids in (("singular", s), ("plural", p)):
      if ctx.vocab_size is not None and ids.max() >= ctx.vocab_size:
        raise TaskError(f"{ctx.source}: built-in {name} verb id {int(ids.max())} is outside the "
                        f"vocabulary (size {ctx.vocab_size})")
    sing = [list(s)] * len(rows)
    plur = [list(p)] * len(rows)
  correct = [pl if f else sg for f, sg, pl in zip(plural, sing, plur, strict=True)]
  wrong = [sg if f else pl for f, sg, pl in zip(plural, sing, plur, strict=True)]
  return {"correct": _pad_sets(correct), "incorrect": _pad_sets(wrong), "plural": _ids(plural)}


def _verb_list(ctx: Ctx) -> str | None:
  """The SVA verb list: `sva_verbs` if given, else the paper's `combined_verb_list.csv` beside the
  CSV."""
  if ctx.sva_verbs:
    return ctx.sva_verbs
  beside = os.path.join(os.path.dirname(os.path.abspath(ctx.source)), VERB_LIST)
  return beside if os.path.isfile(ctx.source) and os.path.isfile(beside) else None


def _warn_builtin_verbs(ctx: Ctx, n_pairs: int) -> None:
  """One warning line on stderr (`runtime.inputs.warn`'s format; `tasks` sits below `runtime`):
  SVA falls back to the built-in verbs, naming the verb list it looked for. Once per `ctx` (a load
  parses the labels more than once)."""
  if "sva_verbs" in ctx.warned:
    return
  ctx.warned.add("sva_verbs")
  if os.path.isfile(ctx.source):
    looked = os.path.join(os.path.dirname(os.path.abspath(ctx.source)), VERB_LIST)
    where = f"no SVA verb list {looked}"
  else:
    where = f"no SVA verb list given (sva_verbs=; the paper's {VERB_LIST})"
  print(f"warning: {ctx.source}: {where}; using {n_pairs} built-in verb pairs instead, so the "
        f"metric differs from the EAP-IG paper's (which uses its {VERB_LIST})",
        file=sys.stderr, flush=True)


def _labels_country(ctx, rows, header):
  c = col(("country_idx", "answer_idx"), header)
  i = col(("corrupted_country_idx", "corrupted_answer_idx"), header)
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


SPECS: dict[str, Spec] = {
    "ioi": ((("correct_idx",), ("incorrect_idx",)), (),
            _labels_pair(("correct_idx",), ("incorrect_idx",))),
    "greater-than": ((("correct_idx",),), (), _labels_greater_than),
    "gender-bias": ((("clean_answer_idx",), ("corrupted_answer_idx",)), (),
                    _labels_pair(("clean_answer_idx",), ("corrupted_answer_idx",))),
    "sva": ((("plural",),), ("singular_idx", "plural_idx"), _labels_sva),
    "country-capital": ((("country_idx", "answer_idx"),), ("corrupted_country_idx",),
                        _labels_country),
    "hypernymy": ((("answers_idx",), ("corrupted_answers_idx",)), (),
                  _labels_pair(("answers_idx",), ("corrupted_answers_idx",), sets=True)),
    "logit-diff": ((("correct_idx",), ("incorrect_idx",)), (), _labels_logit_diff),
    "induction": ((("target",),), (), _labels_induction),
}
# The EAP-IG paper's data sets share the formats above; MIB's tasks, as CSVs, are answer pairs.
SPECS["greater-than-price"] = SPECS["greater-than-sequence"] = SPECS["greater-than"]
SPECS["hypernymy-comma"] = SPECS["hypernymy"]
SPECS["fact-retrieval-comma"] = ((("country_idx",), ("corrupted_country_idx",)), (),
                                  _labels_pair(("country_idx",), ("corrupted_country_idx",)))
for _name in ("mcqa", "arithmetic-addition", "arithmetic-subtraction", "arc-easy", "arc-challenge"):
  SPECS[_name] = SPECS["ioi"]


def fit_hint(name: str, header: Sequence[str]) -> str:
  """"; the file's columns fit task 'x'" when another task uses more of the file's columns than
  `name` does (or `name` lacks some of its own), else ""."""
  fits = {t: len(req) for t, (req, _, _) in SPECS.items()
          if all(col(alts, header) for alts in req)}
  if not fits:
    return ""
  best = max(fits.values())
  if fits.get(name, -1) >= best:
    return ""
  names = [t for t, k in fits.items() if k == best]
  more = f" (or {', '.join(map(repr, names[1:4]))})" if len(names) > 1 else ""
  return f"; the file's columns fit task {names[0]!r}{more}"
