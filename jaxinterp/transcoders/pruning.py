"""Influence, pruning and the graph scores, with circuit-tracer's definitions
(`circuit_tracer.graph`).

With the row-normalised adjacency `An = |A| / rowsum(|A|)` (rows summing to 0 stay 0), a node's
influence on the output is `w @ (An + An^2 + ...)`, `w` being the logit probabilities on the logit
nodes. The graph is a DAG, so the series ends; it is summed until a term is exactly zero.

- `prune` keeps the nodes carrying `node_threshold` of the total influence (plus every token and
  logit), then the edges carrying `edge_threshold` of the edge influence, then repeatedly drops
  feature and error nodes left without outgoing edges and feature nodes without incoming ones.
- `graph_scores`: the replacement score (token influence over token plus error influence) and the
  completeness score (the influence-weighted share of each node's input that is not from errors).

Host numpy in float32, as circuit-tracer's tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxinterp.transcoders.errors import TranscoderError
from jaxinterp.transcoders.graph import AttributionGraph


def normalize_matrix(matrix: np.ndarray, eps: float = 1e-10,
                     out: np.ndarray | None = None) -> np.ndarray:
  """|matrix| with each row divided by its sum (clamped below at `eps`): one new array, divided in
  place (a matrix's worth of host memory, not two), or written into `out` (float32, the matrix's
  shape; it may be `matrix` itself)."""
  a = np.abs(np.asarray(matrix, np.float32), out=out)
  return np.divide(a, np.maximum(a.sum(axis=1, keepdims=True), np.float32(eps)), out=a)


def compute_influence(A: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
  """`weights @ (A + A^2 + ...)` for a nilpotent `A` (TranscoderError if it does not end)."""
  current = weights @ A
  influence = current.copy()
  for _ in range(max_iter):
    if not current.any():
      return influence
    current = current @ A
    influence += current
  if current.any():
    raise TranscoderError(f"influence did not converge after {max_iter} iterations (is the graph "
                          "acyclic?)")
  return influence


def node_influence(adjacency: np.ndarray, logit_weights: np.ndarray) -> np.ndarray:
  """Each node's total influence on the weighted logits. Float[ndarray, "N"]."""
  return compute_influence(normalize_matrix(adjacency), logit_weights)


def edge_influence(pruned: np.ndarray, logit_weights: np.ndarray,
                   in_place: bool = False) -> np.ndarray:
  """Each edge's share of the influence: An[t, s] * (influence of t + logit weight of t).
  `in_place`: overwrite `pruned` (float32) with the result instead of allocating a new matrix."""
  an = normalize_matrix(pruned, out=pruned if in_place else None)
  infl = compute_influence(an, logit_weights) + logit_weights
  if infl.dtype != an.dtype:  # float64 weights: a float64 result, as the product promotes
    return an * infl[:, None]
  return np.multiply(an, infl[:, None], out=an)


def find_threshold(scores: np.ndarray, threshold: float) -> np.float32:
  """The score at which the descending cumulative sum first reaches `threshold` of the total.

  Scores that are all >= 0 (influences) are sorted without their zeros, which end the descending
  order and add nothing to the cumulative sum. The total is still the sum of the whole sorted
  array in numpy's pairwise order (`_padded_sum`), so the result is the same bits as sorting
  everything, without a sorted copy of the matrix.
  """
  flat = np.asarray(scores, np.float32).ravel()
  n_nonzero = int(np.count_nonzero(flat))
  if n_nonzero == len(flat) or not flat.min() >= 0:  # no zeros, or negative or NaN scores
    s = np.sort(flat)[::-1]
    cum = np.cumsum(s, dtype=np.float32) / s.sum(dtype=np.float32)
    i = min(int(np.searchsorted(cum, np.float32(threshold), side="left")), len(cum) - 1)
    return s[i]
  positive = np.sort(flat[np.flatnonzero(flat)])[::-1]  # -0.0 counts as zero, as in the sort
  cum = np.cumsum(positive, dtype=np.float32) / _padded_sum(positive, len(flat))
  i = int(np.searchsorted(cum, np.float32(threshold), side="left"))
  return positive[i] if i < len(positive) else np.float32(0)


def _padded_sum(head: np.ndarray, n: int) -> np.float32:
  """`concatenate([head, zeros(n - len(head))]).sum(dtype=float32)`, bit for bit, without the
  array: numpy sums a contiguous float32 array pairwise, halving it (rounded down to a multiple of
  8) until a block holds at most 128 elements, and a block of zeros sums to 0."""
  if len(head) == n:
    return head.sum(dtype=np.float32)
  if len(head) == 0:
    return np.float32(0)
  if n <= 128:
    block = np.zeros(n, np.float32)
    block[:len(head)] = head
    return block.sum(dtype=np.float32)
  half = n // 2
  half -= half % 8
  return np.float32(_padded_sum(head[:half], half) + _padded_sum(head[half:], n - half))


class PruneResult(NamedTuple):
  """node_mask: Bool[ndarray, "N"]; edge_mask: Bool[ndarray, "N N"]; cumulative_scores:
  Float[ndarray, "N"], each node's cumulative share of the influence in descending order (the
  `influence` the frontend shows); replacement_score and completeness_score: `graph_scores`'s,
  from the same normalised matrix."""

  node_mask: np.ndarray
  edge_mask: np.ndarray
  cumulative_scores: np.ndarray
  replacement_score: float
  completeness_score: float


def check_threshold(name: str, value: float) -> float:
  """A pruning threshold in (0, 1] (TranscoderError: one line)."""
  if not 0.0 < float(value) <= 1.0:
    raise TranscoderError(f"{name} must be in (0, 1], got {value}")
  return float(value)


def prune(graph: AttributionGraph, node_threshold: float = 0.8,
          edge_threshold: float = 0.98) -> PruneResult:
  """circuit-tracer's `prune_graph`: keep the nodes and edges with the most influence; with
  `graph_scores`' two scores, which share its first step.

  Host memory: one N x N float32 array beside the graph's (the normalised adjacency, then, in the
  same buffer, the pruned one and its edge scores) and the N x N boolean edge mask. Each fresh
  matrix-sized array costs its page faults, which on some hosts take longer than the arithmetic.
  """
  check_threshold("node_threshold", node_threshold)
  check_threshold("edge_threshold", edge_threshold)
  n_keep = graph.n_logits + graph.n_pos  # tokens and logits: always kept
  nf = graph.n_features
  w = graph.logit_weights()
  buf = normalize_matrix(graph.adjacency)
  infl = compute_influence(buf, w)
  replacement, completeness = _scores(graph, buf, infl, w)
  node_mask = infl >= find_threshold(infl, node_threshold)
  node_mask[-n_keep:] = True
  np.copyto(buf, graph.adjacency)  # the pruned adjacency, in the same buffer
  buf[~node_mask] = 0
  buf[:, ~node_mask] = 0
  scores = edge_influence(buf, w, in_place=True)
  edge_mask = scores >= find_threshold(scores, edge_threshold)
  del buf, scores
  while True:
    old = node_mask.copy()
    node_mask[:-n_keep] &= edge_mask[:, :-n_keep].any(0)  # features and errors need an output
    node_mask[:nf] &= edge_mask[:nf].any(1)  # features need an input
    if np.array_equal(node_mask, old):
      break
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False
  order = np.argsort(-infl, kind="stable")
  cum = np.cumsum(infl[order], dtype=np.float32) / infl.sum(dtype=np.float32)
  final = np.zeros_like(infl)
  final[order] = cum
  return PruneResult(node_mask, edge_mask, final, replacement, completeness)


def _scores(graph: AttributionGraph, an: np.ndarray, infl: np.ndarray,
            w: np.ndarray) -> tuple[float, float]:
  """The replacement and completeness scores from the normalised adjacency `an` and the node
  influences `infl` (`compute_influence(an, w)`)."""
  e0, e1 = graph.error_start, graph.token_start
  token = infl[e1:graph.logit_start].sum(dtype=np.float32)
  error = infl[e0:e1].sum(dtype=np.float32)
  replacement = token / (token + error)
  non_error = 1 - an[:, e0:e1].sum(axis=-1, dtype=np.float32)
  out = infl + w
  completeness = (non_error * out).sum(dtype=np.float32) / out.sum(dtype=np.float32)
  return float(replacement), float(completeness)


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
  """(replacement score, completeness score), as circuit-tracer's `compute_graph_scores` (`prune`
  returns them too)."""
  w = graph.logit_weights()
  an = normalize_matrix(graph.adjacency)
  return _scores(graph, an, compute_influence(an, w), w)


def partial_influences(edge_matrix: np.ndarray, logit_probabilities: np.ndarray,
                       row_to_node: np.ndarray, max_iter: int = 128) -> np.ndarray:
  """Influence of every node from the rows computed so far (circuit-tracer's
  `compute_partial_influences`, which ranks the features to attribute next).

  Args:
    edge_matrix: Float[ndarray, "rows N"], the rows computed so far (logit rows first).
    logit_probabilities: Float[ndarray, "n_logits"].
    row_to_node: Int[ndarray, "rows"], the node of each row.
  Returns Float[ndarray, "N"].
  """
  an = normalize_matrix(edge_matrix, eps=1e-8)
  n = edge_matrix.shape[1]
  influences = np.zeros(n, np.float32)
  prod = np.zeros(n, np.float32)
  prod[n - len(logit_probabilities):] = logit_probabilities
  for _ in range(max_iter):
    prod = prod[row_to_node] @ an
    if not prod.any():
      return influences
    influences += prod
  raise TranscoderError(f"partial influences did not converge after {max_iter} iterations")
