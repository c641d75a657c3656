"""Task CSVs: reading and writing the EAP-IG format, and building a tokenised `Dataset` from the
rows (`load_task` from a file, `from_rows` from memory); `labels` parses each task's label columns.

Every bad input raises `TaskError` with the file, row and column at fault; bad rows are all named
in one message (the first 20 of each kind, and a count), or left out with `skip_bad_rows=True`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxinterp.tasks.data import Dataset, TaskError
from jaxinterp.tasks.labels import FIELD_COUNT, LISTED, OUT_OF_VOCAB
from jaxinterp.tasks.labels import SPECS as _SPECS
from jaxinterp.tasks.labels import Ctx as _Ctx
from jaxinterp.tasks.labels import Row as _Row
from jaxinterp.tasks.labels import RowError as _RowError
from jaxinterp.tasks.labels import cell as _cell
from jaxinterp.tasks.labels import col as _col
from jaxinterp.tasks.labels import fit_hint as _fit_hint
from jaxinterp.tasks.registry import get_task, task_spec
from jaxinterp.tasks.tokenization import as_tokenizer, encode, find_bos_id, vocab_size_of

# --------------------------------------------------------------------------------------------------
# Building datasets

_EXTRA = "\x00extra"  # a file row's fields beyond the header (a key no header can have: no NULs)


def _check_prompts(ctx: _Ctx, r: _Row, c: list[int], k: list[int]) -> None:
  """Raise `_RowError` if the row's tokenised prompts cannot be patched."""
  if not c or not k:
    col = "clean" if not c else "corrupted"
    raise ctx.error(r, col, "an empty prompt", "the prompt is empty (no tokens)")
  if len(c) != len(k):
    raise ctx.error(
        r, None, "clean and corrupted prompts of different token lengths",
        f"clean and corrupted prompts tokenise to different lengths ({len(c)} vs {len(k)} tokens); "
        f"patching needs aligned positions. clean={_cell(ctx, r, 'clean')[:80]!r} "
        f"corrupted={_cell(ctx, r, 'corrupted')[:80]!r}")
  if ctx.vocab_size is not None:
    for col, ids in (("clean", c), ("corrupted", k)):
      if max(ids) >= ctx.vocab_size or min(ids) < 0:
        bad = max(ids) if max(ids) >= ctx.vocab_size else min(ids)
        raise ctx.error(r, col, OUT_OF_VOCAB,
                        f"token id {bad} is outside the vocabulary (size {ctx.vocab_size})")


def _summary(source: str, bad: list[tuple[_Row, _RowError]], n_rows: int, n_all: int) -> str:
  """One line: how many of the `n_rows` rows read (of `n_all` in the source) are bad, by kind of
  problem with their lines (the first `LISTED` of each kind, then a count), and the first problem
  in full. Rows are named as every row message names them (`Row.label`)."""
  kinds: dict[str, list[_Row]] = {}
  for r, e in bad:
    kinds.setdefault(e.kind, []).append(r)
  parts = []
  for kind, rows in kinds.items():
    where = [str(r.line) if r.line else str(r.index) for r in rows[:LISTED]]
    more = f" and {len(rows) - LISTED} more" if len(rows) > LISTED else ""
    what = ("line" if rows[0].line else "row") + ("s" if len(rows) > 1 else "")
    parts.append(f"{len(rows)} with {kind} ({what} {', '.join(where)}{more})")
  first = str(bad[0][1])
  first = first[len(source) + 2:] if first.startswith(f"{source}: ") else first
  of = f"{n_rows}" if n_rows == n_all else f"the first {n_rows} (of {n_all})"
  return f"{source}: {len(bad)} of {of} rows cannot be used: {'; '.join(parts)}. First, {first}"


def _check_fields(ctx: _Ctx, r: _Row, header: Sequence[str]) -> None:
  """Raise `_RowError` if a file's record has more (non-empty) fields than the header, or fewer than
  its named columns: a comma inside an unquoted prompt splits it, and every later column shifts."""
  if r.n_fields is None:
    return
  named = max((i + 1 for i, h in enumerate(header) if h), default=0)
  extra = r.n_fields > len(header) and any(str(v).strip() for v in r.values.get(_EXTRA, ()))
  if extra:
    raise ctx.error(r, None, FIELD_COUNT,
                    f"the row has {r.n_fields} fields but the header has {len(header)} (too many "
                    f"fields): a comma inside an unquoted prompt or label splits it, so every "
                    f"later column shifts; quote such fields (\"a, b\")")
  if r.n_fields < named:
    raise ctx.error(r, None, FIELD_COUNT,
                    f"the row has {r.n_fields} fields but the header has {named} (too few fields)")


def _build(name: str, rows: list[_Row], header: Sequence[str], tokenizer, *, source: str,
           prepend_bos: bool, bos_id: int | None, vocab_size: int | None,
           n_examples: int | None = None, skip_bad_rows: bool = False,
           sva_verbs=None) -> Dataset:
  task = get_task(name)
  name = task_spec(name).name
  required, _, build_labels = _SPECS[name]
  hint = _fit_hint(name, header)
  has_corrupted = "corrupted" in header  # without it: clean-only data (no patching, see Dataset)
  missing = [c for c in ("clean",) if c not in header]
  missing += ["|".join(alts) for alts in required if _col(alts, header) is None]
  if missing:
    raise TaskError(f"{source}: task {name!r} needs column(s) {', '.join(missing)} which are "
                    f"missing; the file has columns {list(header)}{hint}")
  n_all = len(rows)
  if not skip_bad_rows and n_examples is not None:
    rows = rows[:n_examples]  # rows after the first n_examples are never read
  if not rows:
    raise TaskError(f"{source}: no data rows")
  tokenizer = as_tokenizer(tokenizer)
  if vocab_size is None:
    vocab_size = vocab_size_of(tokenizer)
  ctx = _Ctx(source, tokenizer, vocab_size, os.fspath(sva_verbs) if sva_verbs else None)
  if prepend_bos:
    if bos_id is None:
      bos_id = find_bos_id(tokenizer)
      if bos_id is None:
        raise TaskError("cannot find the tokenizer's BOS token; pass bos_id= or prepend_bos=False")
    if bos_id < 0 or (vocab_size is not None and bos_id >= vocab_size):
      raise TaskError(f"bos_id {bos_id} is outside the vocabulary (size {vocab_size})")
  else:
    bos_id = None

  bad: list[tuple[_Row, _RowError]] = []
  usable = []
  for r in rows:
    try:
      _check_fields(ctx, r, header)
      text = _cell(ctx, r, "clean")
      usable.append((r, text, _cell(ctx, r, "corrupted") if has_corrupted else text))
    except _RowError as e:
      bad.append((r, e))
  enc = {col: encode(tokenizer, [u[i] for u in usable])
         for i, col in ((1, "clean"), (2, "corrupted"))}
  good = []
  for (r, _, _), c, k in zip(usable, enc["clean"], enc["corrupted"], strict=True):
    try:
      _check_prompts(ctx, r, c, k)
      good.append((r, c, k))
    except _RowError as e:
      bad.append((r, e))
  try:
    if good:  # (no rows left: the error below says why)
      build_labels(ctx, [r for r, _, _ in good], header)
  except _RowError:  # find every row at fault, not only the first
    still = []
    for g in good:
      try:
        build_labels(ctx, [g[0]], header)
        still.append(g)
      except _RowError as e:
        bad.append((g[0], e))
    good = still
  bad.sort(key=lambda b: b[0].index)
  n_read = len(rows)
  if n_examples is not None and len(good) > n_examples:  # skipping: only rows up to the last kept
    good.sort(key=lambda g: g[0].index)
    n_read = good[n_examples - 1][0].index + 1  # count, as an error without skipping would
    bad = [b for b in bad if b[0].index < n_read]
  summary = _summary(source, bad, n_read, n_all) if bad else ""
  if bad and not skip_bad_rows:
    raise TaskError(f"{summary}{hint}. Fix these rows, or leave them out with skip_bad_rows=True "
                    f"(--skip_bad_rows)")
  if not good:
    raise TaskError(f"{summary}. No usable rows are left")
  good = good[:n_examples] if n_examples is not None else good
  labels = build_labels(ctx, [r for r, _, _ in good], header)

  lengths = [len(c) + (bos_id is not None) for _, c, _ in good]
  pad_id = bos_id if bos_id is not None else 0
  n, width = len(good), max(lengths)
  clean = np.full((n, width), pad_id, np.int32)
  corrupted = np.full((n, width), pad_id, np.int32)
  off = 1 if bos_id is not None else 0
  for j, (_, c, k) in enumerate(good):
    if off:
      clean[j, 0] = corrupted[j, 0] = bos_id
    clean[j, off:off + len(c)] = c
    corrupted[j, off:off + len(k)] = k
  return Dataset(task=task, clean=clean, corrupted=corrupted, lengths=np.asarray(lengths, np.int32),
                 labels=labels, pad_id=int(pad_id), bos_id=bos_id, source=source,
                 skipped=tuple(str(e) for _, e in bad), skipped_summary=summary,
                 has_corrupted=has_corrupted)


def _read_csv(csv_path) -> tuple[list[str], list[_Row]]:
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
    for rec in reader:
      if not rec or all(not x.strip() for x in rec):
        continue  # blank line
      values = {h: v for h, v in zip(header, rec, strict=False) if h}
      if len(rec) > len(header):
        values[_EXTRA] = rec[len(header):]
      rows.append(_Row(len(rows), reader.line_num, values, len(rec)))
  except csv.Error as e:
    raise TaskError(f"{path}: malformed CSV near line {reader.line_num}: {e}") from None
  return header, rows


def load_task(name: str, csv_path, tokenizer, *, n_examples: int | None = None,
              prepend_bos: bool = True, bos_id: int | None = None,
              vocab_size: int | None = None, skip_bad_rows: bool = False,
              sva_verbs=None) -> Dataset:
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
    skip_bad_rows: leave out rows that cannot be used (unequal token lengths, bad labels, ...)
    instead
      of raising; they are listed in the dataset's `skipped` and `skipped_summary`, and
      `n_examples` counts usable rows.
    sva_verbs: for `sva` without `singular_idx`/`plural_idx` columns, the paper's verb list
      (`tokenization.sva_verb_sets`); by default `combined_verb_list.csv` beside the CSV (the
      paper's layout, `data/sva/`), else the built-in verb pairs (`sva_verb_ids`).

  Returns:
    A `Dataset` of int32 arrays, right padded, with `lengths` counting BOS.

  Raises:
    TaskError: naming every bad row (the first 20 of each kind of problem, and a count).
  """
  get_task(name)
  if n_examples is not None and (not isinstance(n_examples, (int, np.integer)) or n_examples <= 0):
    raise TaskError(f"n_examples must be a positive integer, got {n_examples!r}")
  header, rows = _read_csv(csv_path)
  return _build(name, rows, header, tokenizer, source=os.fspath(csv_path), prepend_bos=prepend_bos,
                bos_id=bos_id, vocab_size=vocab_size, n_examples=n_examples,
                skip_bad_rows=skip_bad_rows, sva_verbs=sva_verbs)


def from_rows(name: str, rows: Sequence[dict[str, Any]], tokenizer, *, prepend_bos: bool = True,
              bos_id: int | None = None, vocab_size: int | None = None,
              source: str = "<rows>", skip_bad_rows: bool = False, sva_verbs=None) -> Dataset:
  """Like `load_task`, from in-memory rows (dicts with the CSV's columns; ids may be ints or lists).
  """
  get_task(name)
  rows = list(rows)
  header = list(rows[0].keys()) if rows else ["clean", "corrupted"]
  wrapped = [_Row(i, 0, {k: v for k, v in r.items()}) for i, r in enumerate(rows)]
  return _build(name, wrapped, header, tokenizer, source=source, prepend_bos=prepend_bos,
                bos_id=bos_id, vocab_size=vocab_size, skip_bad_rows=skip_bad_rows,
                sva_verbs=sva_verbs)


def write_csv(rows: Sequence[dict[str, Any]], path) -> None:
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
      w.writerow({k: (json.dumps(list(map(int, v))) if isinstance(v, (list, tuple, np.ndarray))
                      else v)
                  for k, v in r.items()})
  os.replace(tmp, path)
