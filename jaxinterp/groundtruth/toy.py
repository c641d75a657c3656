"""The bundled toy model: a 2-layer GPT-2-style transformer with a known induction circuit.

The model in `jaxinterp/assets/toy/` was trained by `experiments/train_toy_model.py` on rows of
random tokens in which a block `r_1..r_n` repeats (`repeated_batch`). It is attention-only (its MLPs
are frozen at zero) and contains a previous-token head in layer 0 that K-composes into an induction
head in layer 1 (their indices are in `toy_metadata()`): a circuit with known ground truth for
testing attribution methods. Use `induction_dataset` / `induction_task_dataset` for clean/corrupted
pairs.

Token ids `0..n_tokens-1` are the random "content" tokens and `n_tokens` is BOS; the model has no
text tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxinterp import tasks
from jaxinterp.models import from_pretrained

TOY_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                             "toy")
METADATA_FILE = "toy_metadata.json"

# Defaults of the shipped model; `toy_metadata()` holds the values it was actually trained with.
N_TOKENS = 128
BOS_ID = N_TOKENS
DEFAULT_BLOCK_LEN = 16


class ToyDataError(ValueError):
  """Bad arguments to a toy-model data generator."""


def load_toy(path: str | None = None):
  """Load the bundled induction model (or a model trained by `train_toy_model` at `path`).

  Returns:
    a `models.Model` (no tokenizer).
  """
  return from_pretrained(path or TOY_MODEL_DIR)


def toy_metadata(path: str | None = None) -> dict[str, Any]:
  """The training record stored next to the checkpoint: flags, final loss/accuracy, head indices.

  Keys include `prev_token_head` and `induction_head` (each `[layer, head]`), `n_tokens`, `bos_id`,
  `block_len`, `final_loss`, `final_accuracy` and `flags`.
  """
  p = os.path.join(path or TOY_MODEL_DIR, METADATA_FILE)
  if not os.path.exists(p):
    raise FileNotFoundError(f"{p} not found; train a model with "
                            f"`python -m experiments.train_toy_model --out DIR`")
  with open(p) as f:
    return json.load(f)


def _check(name: str, value: int, lo: int, hi: int | None = None) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ToyDataError(f"{name} must be an int, got {value!r}")
  if value < lo or (hi is not None and value > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ToyDataError(f"{name}={value} must be {rng}")


def _distinct_rows(rng: np.random.Generator, n_rows: int, k: int, n_tokens: int) -> np.ndarray:
  """`n_rows` rows of `k` distinct tokens from `0..n_tokens-1`: Int[ndarray, "rows k"]."""
  return np.argsort(rng.random((n_rows, n_tokens)), axis=1)[:, :k].astype(np.int32)


def repeated_batch(rng: np.random.Generator, batch: int, max_block: int, min_block: int,
                   n_tokens: int = N_TOKENS, bos_id: int = BOS_ID,
                   random_layout: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Training data: `BOS u_1..u_a r_1..r_n w_1..w_g r_1..r_n v_1..` with n per row in [min, max].

  Every row has `1 + 2*max_block` tokens and, apart from the repeated block `r`, all its tokens are
  distinct. The prefix length `a` and the gap `g` between the copies are random (both 0 if not
  `random_layout`), so neither the position of the repeat nor the distance between the copies is
  fixed: only a genuine previous-token + induction circuit predicts the second copy, not a
  positional shortcut.

  Returns:
    tokens: Int[ndarray, "batch 1+2*max_block"].
    mask: Bool[ndarray, "batch 2*max_block"]; mask[b, p] says the prediction at position p (of
      token p+1) is an induction target, i.e. token p+1 is r_2..r_n of the second copy.
  """
  _check("min_block", min_block, 2)
  _check("max_block", max_block, min_block)
  _check("n_tokens", n_tokens, 2 * max_block)
  P = 1 + 2 * max_block
  n = rng.integers(min_block, max_block + 1, size=batch)
  spare = 2 * (max_block - n)
  if random_layout:
    g = rng.integers(0, spare + 1)
    a = rng.integers(0, spare - g + 1)
  else:
    g = a = np.zeros(batch, np.int64)
  u = _distinct_rows(rng, batch, P - 1, n_tokens)  # tokens of the non-repeated positions
  pos = np.arange(1, P)[None, :]  # body positions 1..P-1
  nn, aa, gg = n[:, None], a[:, None], g[:, None]
  start2 = aa + nn + gg + 1  # first position of the second copy
  second = (pos >= start2) & (pos < start2 + nn)
  # Index into u: the second copy re-reads the first copy's tokens, later positions skip it.
  idx = np.where(second, pos - 1 - nn - gg, np.where(pos >= start2 + nn, pos - 1 - nn, pos - 1))
  tokens = np.empty((batch, P), np.int32)
  tokens[:, 0] = bos_id
  tokens[:, 1:] = np.take_along_axis(u, idx, 1)
  tgt = np.arange(1, P)[None, :]  # the token predicted at position p is p + 1
  mask = (tgt >= start2 + 1) & (tgt < start2 + nn)
  return tokens, mask


CORRUPTIONS = ("first_half", "second_half")


def induction_dataset(n: int, seq_len: int | None = None, seed: int = 0,
                      corrupt: str = "first_half", n_tokens: int | None = None,
                      bos_id: int | None = None) -> dict[str, np.ndarray]:
  """Clean/corrupted prompt pairs for the induction task on the toy model.

  With a block `r_1..r_L` of distinct random tokens (L = `seq_len`), the clean prompt is
  `BOS r_1..r_L r_1..r_{L-1}`: at the last position an induction head attends to r_L (the token
  after the earlier r_{L-1}) and the model predicts it. The corrupted prompt replaces one half by
  fresh tokens `s` (disjoint from r), so that no induction is possible; both have `2*L` positions:

    "first_half":  BOS s_1..s_L r_1..r_{L-1}   (the earlier occurrence is gone; the query token is
                   kept, so the clean/corrupted difference flows through the previous-token head
                   into the induction head's *key* and *value*: the textbook K-composition circuit)
    "second_half": BOS r_1..r_L s_1..s_{L-1}   (the query token changes; the difference flows
    through
                   the induction head's *query*, and the previous-token head's outputs at the
                   attended positions are identical in both prompts)

  `correct` is r_L; `incorrect` is a token in neither prompt.

  Args:
    n: number of examples.
    seq_len: the repeated block length L (default: the shipped model's `block_len`).
    seed: numpy seed; the same seed gives the same data.
    corrupt: "first_half" or "second_half", see above.
    n_tokens, bos_id: vocabulary of content tokens `0..n_tokens-1` and the BOS id (default: the
      shipped model's).

  Returns:
    {"clean": int32[n, 2L], "corrupted": int32[n, 2L], "correct": int32[n], "incorrect": int32[n]}.
  """
  meta = _defaults()
  L = meta["block_len"] if seq_len is None else seq_len
  n_tokens = meta["n_tokens"] if n_tokens is None else n_tokens
  bos_id = meta["bos_id"] if bos_id is None else bos_id
  if corrupt not in CORRUPTIONS:
    raise ToyDataError(f"unknown corruption {corrupt!r}; expected one of {CORRUPTIONS}")
  _check("n", n, 1)
  _check("n_tokens", n_tokens, 4)
  _check("seq_len", L, 2, (n_tokens - 1) // 2)
  _check("bos_id", bos_id, 0)
  if bos_id < n_tokens:
    raise ToyDataError(f"bos_id={bos_id} collides with the content tokens 0..{n_tokens - 1}")
  if meta.get("n_ctx") and 2 * L > meta["n_ctx"]:
    raise ToyDataError(f"seq_len={L} gives prompts of {2 * L} tokens, longer than the toy model's "
                       f"context of {meta['n_ctx']}")
  rng = np.random.default_rng(seed)
  # r (L tokens), s (L tokens) and the incorrect label: 2L + 1 distinct tokens per row.
  toks = _distinct_rows(rng, n, 2 * L + 1, n_tokens)
  r, s, wrong = toks[:, :L], toks[:, L:2 * L], toks[:, 2 * L]
  bos = np.full((n, 1), bos_id, np.int32)
  clean = np.concatenate([bos, r, r[:, :L - 1]], 1)
  if corrupt == "first_half":
    corrupted = np.concatenate([bos, s, r[:, :L - 1]], 1)
  else:
    corrupted = np.concatenate([bos, r, s[:, :L - 1]], 1)
  return {"clean": clean.astype(np.int32), "corrupted": corrupted.astype(np.int32),
          "correct": r[:, L - 1].astype(np.int32), "incorrect": wrong.astype(np.int32)}


def _defaults() -> dict[str, int]:
  try:
    m = toy_metadata()
    return {"block_len": int(m["block_len"]), "n_tokens": int(m["n_tokens"]),
            "bos_id": int(m["bos_id"]), "n_ctx": int(m["flags"]["n_ctx"])}
  except (FileNotFoundError, KeyError, ValueError):
    return {"block_len": DEFAULT_BLOCK_LEN, "n_tokens": N_TOKENS, "bos_id": BOS_ID, "n_ctx": 0}


def induction_task_dataset(n: int, seed: int = 0, seq_len: int | None = None,
                           corrupt: str = "first_half"):
  """`induction_dataset` wrapped as a `jaxinterp.tasks.Dataset` with the logit-difference metric.

  Labels are {"correct": r_L, "incorrect": a token in neither prompt}; the task is `logit-diff`
  (logit[correct] - logit[incorrect] at the last position). All prompts have length `2*seq_len`, so
  there is no padding.
  """
  d = induction_dataset(n, seq_len, seed, corrupt)
  bos = _defaults()["bos_id"]
  N, P = d["clean"].shape
  return tasks.Dataset(task=tasks.get_task("logit-diff"), clean=d["clean"],
                       corrupted=d["corrupted"], lengths=np.full(N, P, np.int32),
                       labels={"correct": d["correct"], "incorrect": d["incorrect"]},
                       pad_id=bos, bos_id=bos, source=f"toy induction ({corrupt}, seed={seed})")
