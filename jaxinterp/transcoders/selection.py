"""Which rows `attribution.attribute_graph` computes: the prompt checked, the logit targets, and
in circuit-tracer's ranking loop the unvisited features of most influence (`top_unvisited`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import unembedding
from jaxinterp.transcoders import targets as targets_lib
from jaxinterp.transcoders.errors import TranscoderError


def top_unvisited(scores: np.ndarray, visited: np.ndarray, k: int) -> np.ndarray:
  """The `k` unvisited indices of highest score, highest first, ties in index order: the first `k`
  unvisited of `np.argsort(-scores, kind="stable")`, selected by `np.partition` (linear in the
  sources) and sorting only the `k` selected, not all of them.

  Args:
    scores: Float[ndarray, "n"]. visited: Bool[ndarray, "n"]. k: how many (at most the unvisited).
  Returns Int[ndarray, "k"].
  """
  cand = np.flatnonzero(~visited)  # index order
  key = -scores[cand]
  k = max(min(k, len(cand)), 0)
  if k == 0:
    return cand[:0]
  if k == len(cand) or np.isnan(key).any():  # all of them, or NaN (sorted last): the full sort
    return cand[np.argsort(key, kind="stable")][:k]
  kth = np.partition(key, k - 1)[k - 1]
  chosen = key < kth
  ties = np.flatnonzero(key == kth)  # index order, as the stable sort keeps them
  chosen[ties[:k - int(chosen.sum())]] = True
  return cand[chosen][np.argsort(key[chosen], kind="stable")]


def check_tokens(cfg: ModelConfig, tokens) -> np.ndarray:
  """One prompt's token ids (BOS first) as int32, or a one-line TranscoderError."""
  toks = np.asarray(tokens)
  if toks.ndim != 1 or not np.issubdtype(toks.dtype, np.integer):
    raise TranscoderError(f"tokens must be one prompt's token ids [pos], got shape {toks.shape} "
                          f"of {toks.dtype}")
  if toks.size < 2:
    raise TranscoderError(f"the prompt has {toks.size} token(s) with BOS; it needs at least one "
                          "token after BOS")
  if toks.size > cfg.n_ctx:
    raise TranscoderError(f"the prompt has {toks.size} tokens with BOS, more than the model's "
                          f"context of {cfg.n_ctx}")
  if toks.min() < 0 or toks.max() >= cfg.d_vocab:
    raise TranscoderError(f"token ids outside the vocabulary [0, {cfg.d_vocab})")
  return toks.astype(np.int32)


def logit_targets(cfg: ModelConfig, params: Mapping[str, Any], logits: np.ndarray, targets,
                  max_n_logits: int, desired_logit_prob: float) -> targets_lib.LogitTargets:
  """The targets: `salient_logits` by default; given token ids; or a `LogitTargets` as is.

  `logits` are the replacement model's, which has no final softcap; the targets' probabilities are
  the model's own, soft-capped where the model has a cap (Gemma-2/3), as circuit-tracer 0.5.0's
  `attribute` takes them (its forward keeps the cap). The target vectors are unembedding
  directions either way."""
  if cfg.final_logit_softcap:
    cap = np.float32(cfg.final_logit_softcap)
    logits = np.tanh(logits / cap) * cap
  if isinstance(targets, targets_lib.LogitTargets):
    if targets.vectors.shape[1:] != (cfg.d_model,):
      raise TranscoderError(f"custom targets have vectors of shape {targets.vectors.shape}, "
                            f"expected [k, {cfg.d_model}]")
    return targets
  host = {k: np.asarray(params[k]) for k in ("W_E", "W_U") if k in params}  # no compiled .T
  W_U = np.ascontiguousarray(unembedding(cfg, host), np.float32)  # as the device .T: C order
  if targets is None:
    return targets_lib.salient_logits(logits, W_U, max_n_logits, desired_logit_prob)
  return targets_lib.for_tokens(targets, logits, W_U)
