"""Circuit selection: free functions that take a `Graph` and return a new one.

Selection follows EAP-IG's `Graph.apply_topn` / `apply_threshold` / `apply_greedy` / `prune`: each
function returns a new `Graph` (the scores are copied, never shared) and leaves its argument alone.
`Graph.top_n`, `Graph.threshold`, `Graph.greedy`, `Graph.prune` and `Graph.top_n_nodes` delegate
here.

This module does not import `circuits.graph` (which imports it): it builds its results through the
graph's own `with_edges`, `replace` and `prune`, and names `Graph` only in type hints.
"""

from __future__ import annotations

import heapq
import math
import numbers
from typing import TYPE_CHECKING, Optional

import numpy as np

from jaxinterp.circuits import convention, layout
from jaxinterp.circuits.layout import GraphError

if TYPE_CHECKING:
  from jaxinterp.circuits.graph import Graph

# "Float[ndarray, 'sender receiver']" style shape comments below refer to numpy arrays.


def ranking_key(graph: Graph, absolute: bool) -> np.ndarray:
  """Float[ndarray, "sender receiver"]: what edges are ranked by, |score| or the signed importance
  (`graph.importance()`: higher = more important in either score convention, as EAP-IG and MIB
  rank signed scores)."""
  return np.abs(graph.scores) if absolute else graph.importance()


def top_n(graph: Graph, n: int, *, absolute: bool = True, prune: bool = True) -> Graph:
  """The `n` best-scoring valid edges (by |score| or signed importance), then optionally pruned.

  Ties are broken by edge index (sender-major), so the selection is deterministic and nested:
  `top_n(n)` is a subset of `top_n(n + 1)`. As in EAP-IG, `n` counts edges before pruning.
  """
  n = layout.check_count(n, graph.n_edges, "top_n: n")
  idx = np.flatnonzero(graph.valid)
  key = ranking_key(graph, absolute).ravel()[idx]
  order = np.lexsort((idx, -key))  # primary: score descending; secondary: index ascending
  mask = np.zeros(graph.valid.size, bool)
  mask[idx[order[:n]]] = True
  return graph.with_edges(mask.reshape(graph.valid.shape), prune=prune)


def threshold(graph: Graph, t: float, *, absolute: bool = True, prune: bool = True) -> Graph:
  """Every valid edge whose |score| (or signed importance) is `>= t`, then optionally pruned."""
  if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t):
    raise GraphError(f"threshold must be a real number, got {t!r}")
  return graph.with_edges(graph.valid & (ranking_key(graph, absolute) >= t), prune=prune)


def greedy(graph: Graph, n: int, *, absolute: bool = True, prune: bool = True) -> Graph:
  """EAP-IG's greedy growth from the logits: `n` edges, then optionally pruned.

  Starting from the logits alone, repeatedly add the best-scoring edge whose child node is already
  in the graph; when an edge brings in a new parent node, that node's incoming edges become
  candidates. Ties are broken by edge index. Without pruning, every circuit edge leads to a node
  connected to the logits.
  """
  n = layout.check_count(n, graph.n_edges, "greedy: n")
  L = graph.layout
  key = ranking_key(graph, absolute)
  mask = np.zeros_like(graph.valid)
  nodes = np.zeros(L.n_senders, bool)
  R = L.n_receivers

  def candidates(receivers: np.ndarray) -> list[tuple[float, int]]:
    sub = L.valid[:, receivers]
    s, j = np.nonzero(sub)
    r = receivers[j]
    return list(zip((-key[s, r]).tolist(), (s * R + r).tolist()))

  heap = candidates(np.array([L.logits_receiver]))
  heapq.heapify(heap)
  for _ in range(n):
    _, flat = heapq.heappop(heap)
    s, r = divmod(flat, R)
    mask[s, r] = True
    if not nodes[s]:
      nodes[s] = True
      for item in candidates(L.receivers_of[s]):
        heapq.heappush(heap, item)
  g = graph.replace(in_graph=mask, nodes_in_graph=nodes)
  return g.prune() if prune else g


def prune(graph: Graph) -> Graph:
  """Remove nodes without a parent path from the input or a child path to the logits (EAP-IG).

  Iterates to a fixpoint: a node stays if it has an in-graph outgoing edge and an in-graph incoming
  edge (the input needs none); an edge stays if its sender's and its receiver's nodes stay (the
  logits always do). The result is exactly the edges on some input -> logits path of the circuit,
  so pruning is idempotent and monotone.
  """
  L = graph.layout
  mask = graph.in_graph.copy()
  while True:
    nodes = L.nodes_from_edges(mask)
    keep = nodes[:, None] & np.append(nodes, True)[graph.receiver_node][None, :]
    new = mask & keep
    if np.array_equal(new, mask):
      break
    mask = new
  return graph.replace(in_graph=mask, nodes_in_graph=nodes)


def top_n_nodes(graph: Graph, n: int, *, absolute: bool = True,
                scores: Optional[np.ndarray] = None, prune: bool = True) -> Graph:
  """Keep the `n` best heads/MLPs and every valid edge between kept nodes.

  Node scores are `scores` (Float[ndarray, "sender"]) if given, else `node_attribution` if set (NaN
  entries are treated as unscored and always kept, as in EAP-IG), else `node_scores(absolute)`. The
  input node is always kept and does not count toward `n`; `logits` is always kept. Ties are broken
  by node index. Signed node scores are in the graph's score convention and ranked by importance.
  """
  L = graph.layout
  n = layout.check_count(n, L.n_senders - 1, "top_n_nodes: n")
  if scores is None:
    scores = (graph.node_attribution if graph.node_attribution is not None
              else graph.node_scores(absolute))
  try:
    scores = np.asarray(scores, np.float64)
  except (TypeError, ValueError) as e:
    raise GraphError(f"node scores must be numbers: {e}") from e
  if scores.shape != (L.n_senders,):
    raise GraphError(f"node scores must have shape ({L.n_senders},), got {scores.shape}")
  if np.isinf(scores).any():
    raise GraphError("node scores contain infinite values")
  unscored = np.isnan(scores)
  key = np.abs(scores) if absolute else scores * convention.importance_sign(graph.score_convention)
  cand = np.flatnonzero(~unscored[1:]) + 1
  if n > cand.size:
    raise GraphError(f"top_n_nodes: n={n} exceeds the {cand.size} scored nodes")
  order = np.lexsort((cand, -key[cand]))
  nodes = unscored.copy()
  nodes[0] = True
  nodes[cand[order[:n]]] = True
  mask = graph.valid & nodes[:, None] & np.append(nodes, True)[graph.receiver_node][None, :]
  return graph.with_edges(mask, prune=prune)
