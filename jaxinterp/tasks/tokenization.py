"""Tokenisation for tasks: encoding prompts without special tokens, finding the BOS id, loading a
tokenizer from a path, and the answer token ids of greater-than (two-digit years) and SVA (verbs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxinterp.tasks.data import TaskError

_BOS_CANDIDATES = ("<|begin_of_text|>", "<bos>", "<s>", "<|startoftext|>", "<|endoftext|>")


def vocab_size_of(tokenizer) -> int | None:
  """The tokenizer's vocabulary size (added tokens included), or None if it does not say."""
  try:
    return int(tokenizer.get_vocab_size(with_added_tokens=True))
  except Exception:  # not a `tokenizers.Tokenizer`
    n = getattr(tokenizer, "vocab_size", None)
    return int(n) if isinstance(n, (int, np.integer)) else None


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each text, without special tokens."""
  if hasattr(tokenizer, "encode_batch"):
    return [list(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
  if callable(tokenizer):  # a transformers tokenizer
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
  raise TaskError(f"unsupported tokenizer type {type(tokenizer).__name__}; pass a "
                  "tokenizers.Tokenizer")


def find_bos_id(tokenizer) -> int | None:
  """The tokenizer's BOS id: the token its post-processor prepends, else a well-known BOS token."""
  if hasattr(tokenizer, "encode"):
    try:
      with_sp = tokenizer.encode("a", add_special_tokens=True).ids
      without = tokenizer.encode("a", add_special_tokens=False).ids
      if len(with_sp) > len(without) and with_sp[1:1 + len(without)] == without:
        return int(with_sp[0])
    except Exception:
      pass
  bos = getattr(tokenizer, "bos_token_id", None)
  if isinstance(bos, (int, np.integer)):
    return int(bos)
  for tok in _BOS_CANDIDATES:
    try:
      i = tokenizer.token_to_id(tok)
    except Exception:
      i = None
    if i is not None:
      return int(i)
  return None


def as_tokenizer(tokenizer):
  """`tokenizer` itself, or the `tokenizers.Tokenizer` of a `tokenizer.json` path (or its
  directory)."""
  if isinstance(tokenizer, (str, os.PathLike)):
    from tokenizers import Tokenizer
    path = os.fspath(tokenizer)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    try:
      return Tokenizer.from_file(path)
    except Exception as e:
      raise TaskError(f"cannot load tokenizer {path}: {e}") from None
  return tokenizer


def single_token_words(tokenizer, words: Sequence[str]) -> dict[str, int]:
  """word -> id of the words whose ` word` is exactly one known token (decoding gives the word
  back)."""
  enc = encode(tokenizer, [" " + w for w in words])
  out = {}
  for w, ids in zip(words, enc, strict=True):
    if len(ids) != 1:
      continue
    try:
      back = tokenizer.decode([ids[0]])
    except Exception:
      continue
    if back.strip() == w and ids[0] not in out.values():
      out[w] = ids[0]
  return out


def year_token_ids(tokenizer) -> np.ndarray:
  """int32 [100]: the token id of each two-digit year "00".."99"; each must be a single token."""
  tokenizer = as_tokenizer(tokenizer)
  texts = [f"{y:02d}" for y in range(100)]
  out = []
  for text, ids in zip(texts, encode(tokenizer, texts), strict=True):
    if len(ids) != 1:
      raise TaskError(f"greater-than needs every two-digit year to be one token, but {text!r} "
                      f"tokenises to {len(ids)} tokens {ids}")
    out.append(ids[0])
  if len(set(out)) != 100:
    raise TaskError("greater-than needs the two-digit years to be 100 distinct tokens, but this "
                    f"tokenizer maps them to only {len(set(out))} ids (unknown-token fallback?)")
  return np.asarray(out, np.int32)


# Singular/plural verb pairs for SVA when the CSV brings no verb-id sets.
_SVA_VERBS = (
    ("is", "are"), ("was", "were"), ("has", "have"), ("does", "do"), ("likes", "like"),
    ("loves", "love"), ("hates", "hate"), ("admires", "admire"), ("knows", "know"),
    ("says", "say"), ("thinks", "think"), ("wants", "want"), ("needs", "need"), ("makes", "make"),
    ("takes", "take"), ("gives", "give"), ("sees", "see"), ("gets", "get"), ("goes", "go"),
    ("comes", "come"), ("looks", "look"), ("seems", "seem"), ("lives", "live"), ("works", "work"),
    ("plays", "play"), ("runs", "run"), ("eats", "eat"), ("writes", "write"), ("reads", "read"),
    ("sings", "sing"), ("helps", "help"), ("tells", "tell"), ("believes", "believe"),
    ("remembers", "remember"), ("smiles", "smile"), ("laughs", "laugh"), ("talks", "talk"),
    ("walks", "walk"), ("stays", "stay"), ("leaves", "leave"), ("brings", "bring"),
    ("keeps", "keep"), ("feels", "feel"), ("finds", "find"), ("uses", "use"), ("calls", "call"),
    ("tries", "try"), ("asks", "ask"), ("means", "mean"), ("shows", "show"), ("hears", "hear"),
)


def sva_verb_ids(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(singular ids, plural ids) of the built-in verb pairs whose both forms are one token (` verb`).
  """
  tokenizer = as_tokenizer(tokenizer)
  ids = single_token_words(tokenizer, sorted({w for pair in _SVA_VERBS for w in pair}))
  keep = [(ids[s], ids[p]) for s, p in _SVA_VERBS if s in ids and p in ids]
  if not keep:
    raise TaskError("sva: none of the built-in verbs is a single token for this tokenizer; add "
                    "'singular_idx' and 'plural_idx' columns (JSON lists of verb token ids)")
  return (np.asarray([s for s, _ in keep], np.int32), np.asarray([p for _, p in keep], np.int32))


VERB_LIST = "combined_verb_list.csv"
"""The EAP-IG paper's SVA verb list (`data/sva/combined_verb_list.csv`: columns `sing`, `plur`)."""


def _id_to_token(tokenizer, i: int) -> str | None:
  if hasattr(tokenizer, "id_to_token"):
    return tokenizer.id_to_token(i)
  return tokenizer.convert_ids_to_tokens(i)  # a transformers tokenizer


def _unk_id(tokenizer) -> int | None:
  unk = getattr(tokenizer, "unk_token_id", None)
  if isinstance(unk, (int, np.integer)):
    return int(unk)
  token = getattr(getattr(tokenizer, "model", None), "unk_token", None)
  return tokenizer.token_to_id(token) if isinstance(token, str) else None


def sva_verb_sets(path, tokenizer, vocab_size: int | None = None,
                  strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The EAP-IG paper's SVA answer sets from its verb list: (singular ids, plural ids).

  As the paper's `get_singular_and_plural` computes them: every vocabulary token `Ġw` (a word with
  a leading space, byte-level BPE) whose `w` is in the list's `sing` column is a singular verb; one
  in the `plur` column is a plural verb, but with `strict` (the paper's metric uses it) only when
  ` s` for its singular form `s` (the first row listing `w`) is itself a single known token.

  Args:
    path: the verb list CSV (`idx,sing,plur,freq`, as `data/sva/combined_verb_list.csv`).
    tokenizer: a `tokenizers.Tokenizer` (or path), or a transformers tokenizer.
    vocab_size: ids `0 .. vocab_size - 1` are scanned (the model's output vocabulary); default the
      tokenizer's size.
    strict: the paper's flag (see above).

  Returns:
    int32 arrays of singular and plural verb ids, in id order (about 938 and 935 for GPT-2).

  Raises:
    TaskError: unreadable file, missing columns, a verb in both columns, or no verb in the
    vocabulary.
  """
  import csv
  tokenizer = as_tokenizer(tokenizer)
  path = os.fspath(path)
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise TaskError(f"cannot read the SVA verb list {path}: {e}") from None
  if not rows or not {"sing", "plur"} <= set(rows[0]):
    raise TaskError(f"{path}: an SVA verb list needs the columns 'sing' and 'plur' (as the paper's "
                    f"{VERB_LIST})")
  singular = [r["sing"] for r in rows if r.get("sing") is not None]
  plural = [r["plur"] for r in rows if r.get("plur") is not None]
  both = set(singular) & set(plural)
  if both:
    raise TaskError(f"{path}: {len(both)} verb(s) are listed as both singular and plural: "
                    f"{sorted(both)[:5]}")
  sing_set, plur_set = set(singular), set(plural)
  first_singular = {}
  for s, p in zip(singular, plural, strict=False):
    first_singular.setdefault(p, s)
  n = vocab_size if vocab_size is not None else vocab_size_of(tokenizer)
  if n is None:
    raise TaskError("sva_verb_sets: the tokenizer does not say its vocabulary size; "
                    "pass vocab_size")
  sing_ids, plur_ids, candidates = [], [], []
  for i in range(int(n)):
    token = _id_to_token(tokenizer, i)
    if not token or token[0] != "\u0120":
      continue
    word = token[1:]
    if word in sing_set:
      sing_ids.append(i)
    elif word in plur_set:
      candidates.append((i, first_singular[word]))
  unk = _unk_id(tokenizer)
  forms = encode(tokenizer, [" " + s for _, s in candidates]) if candidates else []
  for (i, _), ids in zip(candidates, forms, strict=True):
    if (len(ids) == 1 and ids[0] != unk) or not strict:
      plur_ids.append(i)
  if not sing_ids or not plur_ids:
    raise TaskError(f"{path}: no singular or no plural verb of the list is a token of this "
                    f"tokenizer (as 'Ġverb'); add 'singular_idx' and 'plural_idx' columns instead")
  return np.asarray(sing_ids, np.int32), np.asarray(plur_ids, np.int32)
