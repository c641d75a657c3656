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
  """Raise `_RowError` if the row's tokenised prompts cannot be patched (unequal lengths can: see
  `_fit`)."""
  if not c or not k:
    col = "clean" if not c else "corrupted"
    raise ctx.error(r, col, "an empty prompt", "the prompt is empty (no tokens)")
  if ctx.vocab_size is not None:
    for col, ids in (("clean", c), ("corrupted", k)):
      if max(ids) >= ctx.vocab_size or min(ids) < 0:
        bad = max(ids) if max(ids) >= ctx.vocab_size else min(ids)
        raise ctx.error(r, col, OUT_OF_VOCAB,
                        f"token id {bad} is outside the vocabulary (size {ctx.vocab_size})")


_PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>")
_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def _special_token(config_dir: str, key: str) -> str | None:
  """The `key` token (`pad_token`, `eos_token`) that transformers' tokenizer files beside a
  tokenizer.json name: tokenizer_config.json first, then special_tokens_map.json."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    try:
      with open(os.path.join(config_dir, name), encoding="utf-8") as f:
        v = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
      continue
    v = v.get("content") if isinstance(v, dict) else v
    if isinstance(v, str):
      return v
  return None


def pad_token_id_of(tokenizer, bos_id: int | None = None, config_dir=None) -> int:
  """The pad token TransformerLens right pads with, so the fill of a corrupted prompt shorter than
  its clean one (`Dataset.fill_id`): the tokenizer's pad token, else its EOS (TransformerLens sets
  pad = EOS when a tokenizer has none: 50256 for GPT-2, `<|end_of_text|>` for Llama 3), else BOS.

  A transformers tokenizer says these ids itself. For a `tokenizers.Tokenizer`, the pad (else EOS)
  token named by the `tokenizer_config.json` / `special_tokens_map.json` in `config_dir` (the
  model's directory: what transformers' AutoTokenizer reads); else its padding setting; else a
  well-known pad token (`<pad>`: Gemma); else a well-known EOS token (`<|endoftext|>`: GPT-2,
  Pythia, Qwen; `<|end_of_text|>`; `</s>`: Llama 2, Mistral); else `bos_id` (or the tokenizer's
  BOS); else 0.
  """
  for attr in ("pad_token_id", "eos_token_id"):  # a transformers tokenizer
    v = getattr(tokenizer, attr, None)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
      return int(v)
  has_vocab = hasattr(tokenizer, "token_to_id")
  if config_dir is not None and has_vocab and os.path.isdir(os.fspath(config_dir)):
    for key in ("pad_token", "eos_token"):
      token = _special_token(os.fspath(config_dir), key)
      i = tokenizer.token_to_id(token) if token is not None else None
      if i is not None:
        return int(i)
  padding = getattr(tokenizer, "padding", None)
  if isinstance(padding, dict) and isinstance(padding.get("pad_id"), int):
    return int(padding["pad_id"])
  if has_vocab:
    for token in _PAD_TOKENS + _EOS_TOKENS:
      i = tokenizer.token_to_id(token)
      if i is not None:
        return int(i)
  if bos_id is None:
    bos_id = find_bos_id(tokenizer)
  return int(bos_id) if bos_id is not None else 0


def _fit(ctx: _Ctx, good: list, off: int, clean: np.ndarray, corrupted: np.ndarray,
         pad_token_id: int | None, bos_id: int | None, config_dir: str | None
         ) -> tuple[int, str, int | None]:
  """Write each row's corrupted prompt into `corrupted` aligned with its clean one by index, as
  EAP-IG runs a pair of unequal token lengths: a shorter one filled up to the clean length with
  the pad token (attended: the clean attention mask says real), a longer one cut after the clean
  prompt's last token (exact under causal attention). Returns (rows fitted, one line, fill id)."""
  short = [j for j, (_, c, k) in enumerate(good) if len(k) < len(c)]
  long = [j for j, (_, c, k) in enumerate(good) if len(k) > len(c)]
  fill = None
  if short:
    fill = (pad_token_id if pad_token_id is not None
            else pad_token_id_of(ctx.tokenizer, bos_id, config_dir))
    if fill < 0 or (ctx.vocab_size is not None and fill >= ctx.vocab_size):
      raise TaskError(f"{ctx.source}: the pad token id {fill} (which fills corrupted prompts "
                      f"shorter than their clean ones) is outside the vocabulary (size "
                      f"{ctx.vocab_size}); pass pad_token_id=")
  for j, (_, c, k) in enumerate(good):
    k = k[:len(c)]
    corrupted[j, off:off + len(k)] = k
    if len(k) < len(c):
      corrupted[j, off + len(k):off + len(c)] = fill
  n = len(short) + len(long)
  if not n:
    return 0, "", None

  def where(js):  # rows named as `_summary` names them
    what = ("line" if good[js[0]][0].line else "row") + ("s" if len(js) > 1 else "")
    lines = [str(good[j][0].line or good[j][0].index) for j in js[:LISTED]]
    more = f" and {len(js) - LISTED} more" if len(js) > LISTED else ""
    return f"{what} {', '.join(lines)}{more}"

  parts = []
  if short:
    parts.append(f"{len(short)} shorter filled with the pad token {fill} ({where(short)})")
  if long:
    parts.append(f"{len(long)} longer cut after the clean prompt's last token ({where(long)})")
  return n, (f"{ctx.source}: {n} of {len(good)} rows: corrupted prompt fitted to the clean "
             f"length (EAP-IG/MIB semantics: positions aligned by index, the clean attention "
             f"mask): {'; '.join(parts)}"), fill


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
           sva_verbs=None, pad_token_id: int | None = None) -> Dataset:
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
  config_dir = None  # a tokenizer given by path: its transformers files name the pad token
  if isinstance(tokenizer, (str, os.PathLike)):
    config_dir = os.fspath(tokenizer)
    config_dir = config_dir if os.path.isdir(config_dir) else os.path.dirname(config_dir)
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
  for j, (_, c, _) in enumerate(good):
    if off:
      clean[j, 0] = corrupted[j, 0] = bos_id
    clean[j, off:off + len(c)] = c
  n_fitted, fitted, fill = _fit(ctx, good, off, clean, corrupted, pad_token_id, bos_id,
                                config_dir)
  return Dataset(task=task, clean=clean, corrupted=corrupted, lengths=np.asarray(lengths, np.int32),
                 labels=labels, pad_id=int(pad_id), bos_id=bos_id, source=source,
                 skipped=tuple(str(e) for _, e in bad), skipped_summary=summary,
                 has_corrupted=has_corrupted, fitted=n_fitted, fitted_summary=fitted,
                 fill_id=fill)


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
              sva_verbs=None, pad_token_id: int | None = None) -> Dataset:
  """Load a task CSV (EAP-IG format) and tokenise it.

  Clean and corrupted prompts may tokenise to different lengths: as EAP-IG and MIB run such a pair
  (positions aligned by index, the clean attention mask, the metric at the clean prompt's last
  token), a shorter corrupted prompt is filled up to the clean length with the pad token, a longer
  one cut after the clean prompt's last token; the dataset counts them (`fitted`,
  `fitted_summary`).

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
    skip_bad_rows: leave out rows that cannot be used (empty prompts, bad labels, ...) instead of
      raising; they are listed in the dataset's `skipped` and `skipped_summary`, and `n_examples`
      counts usable rows.
    sva_verbs: for `sva` without `singular_idx`/`plural_idx` columns, the paper's verb list
      (`tokenization.sva_verb_sets`); by default `combined_verb_list.csv` beside the CSV (the
      paper's layout, `data/sva/`), else the built-in verb pairs (`sva_verb_ids`).
    pad_token_id: the pad token filling corrupted prompts shorter than their clean ones; default
      `pad_token_id_of(tokenizer)` (the tokenizer's pad token, else EOS, as TransformerLens; a
      tokenizer given by path reads them from the transformers files beside it).

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
                skip_bad_rows=skip_bad_rows, sva_verbs=sva_verbs, pad_token_id=pad_token_id)


def from_rows(name: str, rows: Sequence[dict[str, Any]], tokenizer, *, prepend_bos: bool = True,
              bos_id: int | None = None, vocab_size: int | None = None,
              source: str = "<rows>", skip_bad_rows: bool = False, sva_verbs=None,
              pad_token_id: int | None = None) -> Dataset:
  """Like `load_task`, from in-memory rows (dicts with the CSV's columns; ids may be ints or lists).
  """
  get_task(name)
  rows = list(rows)
  header = list(rows[0].keys()) if rows else ["clean", "corrupted"]
  wrapped = [_Row(i, 0, {k: v for k, v in r.items()}) for i, r in enumerate(rows)]
  return _build(name, wrapped, header, tokenizer, source=source, prepend_bos=prepend_bos,
                bos_id=bos_id, vocab_size=vocab_size, skip_bad_rows=skip_bad_rows,
                sva_verbs=sva_verbs, pad_token_id=pad_token_id)


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
