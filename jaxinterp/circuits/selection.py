"""Circuit selection: free functions that take a `Graph` and return a new one.

Selection follows EAP-IG's `Graph.apply_topn` / `apply_threshold` / `apply_greedy` / `prune`: each
function returns a new `Graph` (the scores are copied, never shared) and leaves its argument alone.
`Graph.top_n`, `Graph.threshold`, `Graph.greedy` and `Graph.prune` delegate here.

Ranking (`ranked`): by |score| (`absolute=True`) or by signed importance (`circuits.convention`:
higher = more important in either score convention), best first, ties broken by flat index, so
every selection is deterministic and nested (`top_n(n)` is a subset of `top_n(n + 1)`).

`top_n` selects at three levels (`level=`), as EAP-IG's `apply_topn(n, level=...)`:

- `"edge"`: the n best valid edges (`graph.scores`);
- `"node"`: the n best nodes by `graph.node_attribution`. **The input node is a node like the
  others**: it is ranked, counts toward n and can be left out (EAP-IG's and MIB's rule; a node
  circuit without the input is empty once pruned). NaN entries are unscored and always kept;
  `logits` is always kept. Every valid edge between kept nodes (or into the logits) is in;
- `"neuron"`: the n best output dimensions by `graph.neuron_scores` (NaN = always kept); a node
  with a kept neuron is kept with all its valid outgoing edges, and the neurons of nodes that
  pruning removes are dropped from `neurons_in_graph`.

This module does not import `circuits.graph` (which imports it): it builds its results through the
graph's own `with_edges`, `replace` and `prune`, and names `Graph` only in type hints.
"""

from __future__ import annotations

import heapq
import math
import numbers
from typing import TYPE_CHECKING

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


def ranked(scores: np.ndarray, *, absolute: bool = True,
           score_convention: str = convention.LOSS) -> np.ndarray:
  """Int[ndarray, "k"]: the flat indices of the scored (non-NaN) entries of `scores`, best first.

  Ranked by |score| or, with `absolute=False`, by signed importance in `score_convention`; ties
  are broken by flat index.
  """
  flat = np.asarray(scores, np.float64).ravel()
  idx = np.flatnonzero(~np.isnan(flat))
  key = np.abs(flat[idx]) if absolute else flat[idx] * convention.importance_sign(score_convention)
  return idx[np.lexsort((idx, -key))]


def top_n(graph: Graph, n: int, *, level: str = "edge", absolute: bool = True,
          prune: bool = True) -> Graph:
  """The `n` best-scoring edges, nodes or neurons (`level`, see the module docstring), as a
  circuit, then optionally pruned.

  As in EAP-IG, `n` counts items before pruning. Signed scores are read in the graph's
  `score_convention`.
  """
  if level == "node":
    return _top_n_nodes(graph, n, absolute, prune)
  if level == "neuron":
    return _top_n_neurons(graph, n, absolute, prune)
  if level != "edge":
    raise GraphError(f"level must be 'edge', 'node' or 'neuron', got {level!r}")
  n = layout.check_count(n, graph.n_edges, "top_n: n")
  order = ranked(np.where(graph.valid, graph.scores, np.nan), absolute=absolute,
                 score_convention=graph.score_convention)
  mask = np.zeros(graph.valid.size, bool)
  mask[order[:n]] = True
  return graph.with_edges(mask.reshape(graph.valid.shape), prune=prune)


def _top_n_nodes(graph: Graph, n: int, absolute: bool, prune: bool) -> Graph:
  scores = graph.node_attribution
  if scores is None:
    raise GraphError("node-level selection needs node scores (node_attribution)")
  order = ranked(scores, absolute=absolute, score_convention=graph.score_convention)
  n = layout.check_count(n, order.size, "top_n: n (scored nodes)")
  nodes = np.isnan(scores)
  nodes[order[:n]] = True
  mask = graph.valid & nodes[:, None] & np.append(nodes, True)[graph.receiver_node][None, :]
  return graph.with_edges(mask, prune=prune)


def _top_n_neurons(graph: Graph, n: int, absolute: bool, prune: bool) -> Graph:
  scores = graph.neuron_scores
  if scores is None:
    raise GraphError("neuron-level selection needs neuron scores (neuron_scores)")
  order = ranked(scores, absolute=absolute, score_convention=graph.score_convention)
  n = layout.check_count(n, order.size, "top_n: n (scored neurons)")
  keep = np.isnan(scores).ravel()
  keep[order[:n]] = True
  keep = keep.reshape(scores.shape)
  g = graph.replace(neurons_in_graph=keep).with_edges(graph.valid & keep.any(1)[:, None],
                                                       prune=prune)
  return g.replace(neurons_in_graph=keep & g.nodes_in_graph[:, None])


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
    return list(zip((-key[s, r]).tolist(), (s * R + r).tolist(), strict=True))

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
