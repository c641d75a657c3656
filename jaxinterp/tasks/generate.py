"""Task generators: IOI and greater-than prompt pairs from templates and word lists (single-token
words only, equal clean/corrupted lengths), and random-token induction examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxinterp.tasks.csv_io import from_rows
from jaxinterp.tasks.data import Dataset, TaskError
from jaxinterp.tasks.registry import get_task
from jaxinterp.tasks.tokenization import as_tokenizer, encode, single_token_words, year_token_ids

_NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Kate", "Paul", "Laura",
    "Michael", "David", "Sarah", "Anna", "Jessica", "Andrew", "Thomas", "Daniel", "Robert",
    "Richard", "Mark", "Steven", "Brian", "Kevin", "Jason", "Jeff", "Ryan", "Eric", "Adam", "Peter",
    "Henry", "Lisa", "Emily", "Rachel", "Alice", "Bob", "Jack", "Ben", "Sam", "Joe", "Mike", "Alex",
    "Nick", "Chris", "Rose", "Grace", "Emma", "Lucy", "Helen", "Victoria", "Jennifer", "Elizabeth",
    "William", "George",
)
_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
           "park", "beach", "library", "market", "church", "museum", "hotel", "bank")
_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book",
            "letter", "ball", "flower", "gift", "key", "bottle", "bag", "hat", "phone")
# {A} = indirect object (the answer), {B} = subject (repeated), {P} place, {O} object.
_IOI_TEMPLATES = (
    "Then, {B} and {A} went to the {P}. {B} gave a {O} to",
    "Then, {A} and {B} went to the {P}. {B} gave a {O} to",
    "When {B} and {A} got a {O} at the {P}, {B} decided to give it to",
    "When {A} and {B} got a {O} at the {P}, {B} decided to give it to",
    "After {B} and {A} went to the {P}, {B} gave a {O} to",
    "After {A} and {B} went to the {P}, {B} gave a {O} to",
    "While {B} and {A} were working at the {P}, {B} gave a {O} to",
    "While {A} and {B} were working at the {P}, {B} gave a {O} to",
    "Friends {B} and {A} found a {O} at the {P}. {B} gave it to",
    "Friends {A} and {B} found a {O} at the {P}. {B} gave it to",
)

_GT_NOUNS = ("war", "reign", "project", "contract", "plan", "journey", "trial", "expedition",
             "siege", "program", "study", "campaign", "dynasty", "marriage", "tour", "dispute",
             "occupation", "strike", "investigation", "construction", "partnership", "empire")
_GT_TEMPLATES = (
    "The {noun} lasted from the year {XX}{YY} to the year {XX}",
    "The {noun} started in the year {XX}{YY} and ended in the year {XX}",
)


def _generate(n: int, seed: int, what: str, candidate: Callable,
              check: Callable) -> list[dict[str, Any]]:
  if not isinstance(n, (int, np.integer)) or n <= 0:
    raise TaskError(f"{what}: n must be a positive integer, got {n!r}")
  rng = np.random.default_rng(seed)
  rows, seen = [], set()
  tries = 0
  while len(rows) < n and tries < 50 * n + 1000:
    tries += 1
    row = candidate(rng)
    if row is None or row["clean"] in seen:
      continue
    seen.add(row["clean"])
    rows.append(row)
  rows = check(rows)
  if len(rows) < n:
    raise TaskError(f"{what}: could only build {len(rows)} of {n} valid examples with this "
                    "tokenizer")
  return rows[:n]


def _equal_length_filter(tokenizer):
  def check(rows):
    cl = encode(tokenizer, [r["clean"] for r in rows])
    co = encode(tokenizer, [r["corrupted"] for r in rows])
    return [r for r, a, b in zip(rows, cl, co, strict=True) if len(a) == len(b) and a]
  return check


def ioi_rows(tokenizer, n: int, seed: int = 0) -> list[dict[str, Any]]:
  """`n` IOI rows (`clean`, `corrupted`, `correct_idx`, `incorrect_idx`) from templates.

  The clean prompt names A (the indirect object, the answer) and B (the subject) and repeats B; the
  corrupted prompt replaces the repeated B with a third name C, as in the EAP-IG data. Names, places
  and objects are kept only if ` word` is one token, and rows only if clean and corrupted tokenise
  to equal lengths.
  """
  tokenizer = as_tokenizer(tokenizer)
  names = single_token_words(tokenizer, _NAMES)
  if len(names) < 3:
    raise TaskError("make_ioi: fewer than 3 of the built-in names are single tokens for this "
                    "tokenizer")
  name_list = sorted(names)

  def candidate(rng):
    a, b, c = (name_list[i] for i in rng.choice(len(name_list), 3, replace=False))
    t = _IOI_TEMPLATES[rng.integers(len(_IOI_TEMPLATES))]
    p = _PLACES[rng.integers(len(_PLACES))]
    o = _OBJECTS[rng.integers(len(_OBJECTS))]
    clean = t.format(A=a, B=b, P=p, O=o)
    head, tail = clean.rsplit(" " + b + " ", 1)
    corrupted = f"{head} {c} {tail}"
    return {"clean": clean, "corrupted": corrupted, "correct_idx": names[a],
            "incorrect_idx": names[b]}

  return _generate(n, seed, "make_ioi", candidate, _equal_length_filter(tokenizer))


def make_ioi(tokenizer, n: int, seed: int = 0, *, prepend_bos: bool = True,
             bos_id: int | None = None, vocab_size: int | None = None) -> Dataset:
  """An IOI `Dataset` of `n` template examples (see `ioi_rows`), deterministic in `seed`."""
  tokenizer = as_tokenizer(tokenizer)
  return from_rows("ioi", ioi_rows(tokenizer, n, seed), tokenizer, prepend_bos=prepend_bos,
                   bos_id=bos_id, vocab_size=vocab_size, source=f"make_ioi(n={n}, seed={seed})")


def greater_than_rows(tokenizer, n: int, seed: int = 0) -> list[dict[str, Any]]:
  """`n` greater-than rows (`clean`, `corrupted`, `correct_idx` = YY) from templates.

  Clean: "The war lasted from the year 1352 to the year 13"; corrupted: the start year's last two
  digits replaced by 01 ("... 1301 to the year 13"). Kept only if every two-digit year is one token,
  the years split as [" XX", "YY"] (so the model sees YY as a token), the noun is one token, and
  clean and corrupted tokenise to equal lengths. YY is drawn from 02..98 and XX from 11..17.
  """
  tokenizer = as_tokenizer(tokenizer)
  year_ids = year_token_ids(tokenizer)
  nouns = sorted(single_token_words(tokenizer, _GT_NOUNS))
  if not nouns:
    raise TaskError("make_greater_than: none of the built-in nouns is a single token for this "
                    "tokenizer")
  splits_ok = {}

  def year_splits(xx: int, yy: int) -> bool:
    key = (xx, yy)
    if key not in splits_ok:
      full, cent = encode(tokenizer, [f" {xx}{yy:02d}", f" {xx}"])
      splits_ok[key] = full == cent + [int(year_ids[yy])]
    return splits_ok[key]

  def candidate(rng):
    xx = int(rng.integers(11, 18))
    yy = int(rng.integers(2, 99))
    if not (year_splits(xx, yy) and year_splits(xx, 1)):
      return None
    noun = nouns[rng.integers(len(nouns))]
    t = _GT_TEMPLATES[rng.integers(len(_GT_TEMPLATES))]
    return {"clean": t.format(noun=noun, XX=xx, YY=f"{yy:02d}"),
            "corrupted": t.format(noun=noun, XX=xx, YY="01"), "correct_idx": yy}

  return _generate(n, seed, "make_greater_than", candidate, _equal_length_filter(tokenizer))


def make_greater_than(tokenizer, n: int, seed: int = 0, *, prepend_bos: bool = True,
                      bos_id: int | None = None, vocab_size: int | None = None) -> Dataset:
  """A greater-than `Dataset` of `n` template examples (see `greater_than_rows`)."""
  tokenizer = as_tokenizer(tokenizer)
  return from_rows("greater-than", greater_than_rows(tokenizer, n, seed), tokenizer,
                   prepend_bos=prepend_bos, bos_id=bos_id, vocab_size=vocab_size,
                   source=f"make_greater_than(n={n}, seed={seed})")


def make_induction(n: int, half_len: int, vocab_size: int, seed: int = 0, *,
                   bos_id: int | None = 0, low: int = 1) -> Dataset:
  """Induction examples of random tokens, no tokenizer needed.

  Clean: `[BOS] r_1..r_L r_1..r_{L-1}`, so an induction head predicts `r_L` at the last position.
  Corrupted: `[BOS] s_1..s_L r_1..r_{L-1}` with fresh random `s`: the first occurrence is replaced,
  so nothing can be copied while the query token at the last position stays the same. (Replacing the
  second half instead would leave the induction head's keys, which sit in the first half, identical
  in both runs, hiding the previous-token -> induction-head K-composition from any patching method.)
  Tokens are drawn from `[low, vocab_size)` without repeats. The metric is log p(r_L).

  Args:
    n: number of examples; half_len: L (>= 2); vocab_size: the model's vocabulary size.
    seed: PRNG seed (numpy), recorded by the caller for reproducibility.
    bos_id: prepended id, or None for no BOS.
    low: smallest token id drawn (keep special ids out).
  """
  if n <= 0 or half_len < 2:
    raise TaskError(f"make_induction: need n >= 1 and half_len >= 2, got n={n}, "
                    f"half_len={half_len}")
  if vocab_size - low < 2 * half_len:
    raise TaskError(f"make_induction: vocabulary [{low}, {vocab_size}) too small for "
                    f"half_len={half_len}")
  rng = np.random.default_rng(seed)
  off = 0 if bos_id is None else 1
  width = off + 2 * half_len - 1
  clean = np.zeros((n, width), np.int32)
  corrupted = np.zeros((n, width), np.int32)
  target = np.zeros(n, np.int32)
  for i in range(n):
    toks = rng.choice(np.arange(low, vocab_size), 2 * half_len, replace=False)
    r, s = toks[:half_len], toks[half_len:]
    if off:
      clean[i, 0] = corrupted[i, 0] = bos_id
    clean[i, off:] = np.concatenate([r, r[:-1]])
    corrupted[i, off:] = np.concatenate([s, r[:-1]])
    target[i] = r[-1]
  return Dataset(task=get_task("induction"), clean=clean, corrupted=corrupted,
                 lengths=np.full(n, width, np.int32), labels={"target": target},
                 pad_id=0 if bos_id is None else int(bos_id), bos_id=bos_id,
                 source=f"make_induction(n={n}, half_len={half_len}, seed={seed})")
