"""Tokenisation for tasks: encoding prompts without special tokens, finding the BOS id, loading a
tokenizer from a path, and the answer token ids of greater-than (two-digit years) and SVA (verbs).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jaxinterp.tasks.data import TaskError

_BOS_CANDIDATES = ("<|begin_of_text|>", "<bos>", "<s>", "<|startoftext|>", "<|endoftext|>")


def vocab_size_of(tokenizer) -> Optional[int]:
  """The tokenizer's vocabulary size (added tokens included), or None if it does not say."""
  try:
    return int(tokenizer.get_vocab_size(with_added_tokens=True))
  except Exception:  # not a `tokenizers.Tokenizer`
    n = getattr(tokenizer, "vocab_size", None)
    return int(n) if isinstance(n, (int, np.integer)) else None


def encode(tokenizer, texts: Sequence[str]) -> List[List[int]]:
  """Token ids of each text, without special tokens."""
  if hasattr(tokenizer, "encode_batch"):
    return [list(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
  if callable(tokenizer):  # a transformers tokenizer
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
  raise TaskError(f"unsupported tokenizer type {type(tokenizer).__name__}; pass a tokenizers.Tokenizer")


def find_bos_id(tokenizer) -> Optional[int]:
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
  """`tokenizer` itself, or the `tokenizers.Tokenizer` of a `tokenizer.json` path (or its directory)."""
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


def single_token_words(tokenizer, words: Sequence[str]) -> Dict[str, int]:
  """word -> id of the words whose ` word` is exactly one known token (decoding gives the word back)."""
  enc = encode(tokenizer, [" " + w for w in words])
  out = {}
  for w, ids in zip(words, enc):
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
  for text, ids in zip(texts, encode(tokenizer, texts)):
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


def sva_verb_ids(tokenizer) -> Tuple[np.ndarray, np.ndarray]:
  """(singular ids, plural ids) of the built-in verb pairs whose both forms are one token (` verb`)."""
  tokenizer = as_tokenizer(tokenizer)
  ids = single_token_words(tokenizer, sorted({w for pair in _SVA_VERBS for w in pair}))
  keep = [(ids[s], ids[p]) for s, p in _SVA_VERBS if s in ids and p in ids]
  if not keep:
    raise TaskError("sva: none of the built-in verbs is a single token for this tokenizer; add "
                    "'singular_idx' and 'plural_idx' columns (JSON lists of verb token ids)")
  return (np.asarray([s for s, _ in keep], np.int32), np.asarray([p for _, p in keep], np.int32))
