"""The logit targets an attribution graph explains (circuit-tracer's `AttributionTargets`).

Each target is a direction in the residual stream before the unembedding with a weight: for a token,
its column of the unembedding minus the mean column ("demeaned", so that the direction measures the
token's logit against the average logit), weighted by its probability. By default the targets are
the most likely next tokens, taken until their cumulative probability reaches `desired_logit_prob`,
at most `max_n_logits` of them (`salient_logits`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinterp.transcoders.errors import TranscoderError


@dataclasses.dataclass(frozen=True)
class LogitTargets:
  """Attribution targets.

  Attributes:
    token_ids: Int[ndarray, "k"], vocabulary indices (custom directions: `vocab_size + i`).
    probabilities: Float[ndarray, "k"] (float32), each target's weight.
    vectors: Float[ndarray, "k d_model"] (float32), the directions attributed.
  """

  token_ids: np.ndarray
  probabilities: np.ndarray
  vectors: np.ndarray

  def __len__(self) -> int:
    return len(self.token_ids)


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax in float32 over the last axis."""
  x = np.asarray(logits, np.float32)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _check(logits: np.ndarray, unembed: np.ndarray) -> None:
  if logits.ndim != 1:
    raise TranscoderError(f"logits must be one position's [d_vocab], got shape {logits.shape}")
  if unembed.ndim != 2 or unembed.shape[1] != logits.shape[0]:
    raise TranscoderError(f"unembed has shape {unembed.shape}, expected [d_model, "
                          f"{logits.shape[0]}]")


def for_tokens(token_ids, logits: np.ndarray, unembed: np.ndarray) -> LogitTargets:
  """Targets for given tokens: their probabilities and demeaned unembedding columns.

  Args:
    token_ids: Int[ndarray, "k"].
    logits: Float[ndarray, "d_vocab"], the last position's logits.
    unembed: Float[ndarray, "d_model d_vocab"], the unembedding (TransformerLens's W_U).
  """
  logits, unembed = np.asarray(logits), np.asarray(unembed, np.float32)
  _check(logits, unembed)
  ids = np.asarray(token_ids, np.int64).reshape(-1)
  if ids.size == 0:
    raise TranscoderError("no logit targets given")
  bad = ids[(ids < 0) | (ids >= logits.shape[0])]
  if bad.size:
    raise TranscoderError(f"target token ids outside the vocabulary [0, {logits.shape[0]}): "
                          f"{bad.tolist()}")
  probs = softmax(logits)[ids]
  vecs = (unembed[:, ids] - unembed.mean(axis=1, keepdims=True)).T
  return LogitTargets(ids, probs, np.ascontiguousarray(vecs, np.float32))


def salient_logits(logits: np.ndarray, unembed: np.ndarray, max_n_logits: int = 10,
                   desired_logit_prob: float = 0.95) -> LogitTargets:
  """The most likely tokens until their cumulative probability reaches `desired_logit_prob`
  (the token that reaches it included), at most `max_n_logits`."""
  if max_n_logits < 1:
    raise TranscoderError(f"max_n_logits must be at least 1, got {max_n_logits}")
  if not 0.0 < desired_logit_prob <= 1.0:
    raise TranscoderError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
  probs = softmax(np.asarray(logits))
  top = np.argsort(-probs, kind="stable")[:max_n_logits]
  cum = np.cumsum(probs[top], dtype=np.float32)
  cutoff = int(np.searchsorted(cum, np.float32(desired_logit_prob), side="left")) + 1
  return for_tokens(top[:cutoff], logits, unembed)


def custom(vectors: np.ndarray, weights, vocab_size: int) -> LogitTargets:
  """Targets for arbitrary directions (e.g. a logit difference), with circuit-tracer's virtual
  token ids `vocab_size + i`. vectors: Float[ndarray, "k d_model"]; weights: Float[ndarray, "k"]."""
  vecs = np.asarray(vectors, np.float32)
  w = np.asarray(weights, np.float32).reshape(-1)
  if vecs.ndim != 2 or vecs.shape[0] != w.shape[0] or w.size == 0:
    raise TranscoderError(f"custom targets: {vecs.shape} vectors for {w.shape[0]} weights "
                          "(expected [k, d_model] and [k], k >= 1)")
  return LogitTargets(vocab_size + np.arange(len(w), dtype=np.int64), w, vecs)
