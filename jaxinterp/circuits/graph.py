"""The `Graph`: edge scores and a circuit (edge and node masks) over one model's EAP-IG graph.

A `Graph` holds dense `[n_senders, n_receivers]` matrices over the layout of `circuits.layout`. Node
membership follows EAP-IG: a (sender) node is in the graph when it has an in-graph outgoing edge and
an in-graph incoming edge (the input counts as having one); `logits` is always in the graph.

Selection (`circuits.selection`) and reading and writing files (`circuits.io`) are free functions
over a `Graph`; the methods of the same names here delegate to them, so `graph.top_n(20)` and
`selection.top_n(graph, 20)` are the same call. Neither module imports this one.

All bad input raises `GraphError` (a `ValueError`) with a message that names what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxinterp.circuits import convention, io, layout, selection
from jaxinterp.circuits.layout import GraphError

# "Float[ndarray, 'sender receiver']" style shape comments below refer to numpy arrays.


class Graph:
  """Edge scores and a circuit (in-graph masks) over one model's EAP-IG graph.

  Attributes:
    cfg: the model config (or `GraphShape`) the graph was built for.
    scores: Float[ndarray, "sender receiver"] float32 edge scores; 0 on invalid edges.
    in_graph: Bool[ndarray, "sender receiver"]; the circuit's edges (always a subset of `valid`).
    valid: Bool[ndarray, "sender receiver"]; read-only mask of the edges that exist in the model.
    nodes_in_graph: Bool[ndarray, "sender"]; the circuit's nodes among the senders (`logits` is
      always in the graph and has no entry).
    node_attribution: optional Float[ndarray, "sender"]; node scores from a node-level attribution
      (NaN for unscored nodes), written as the nodes' "score" in JSON as EAP-IG does.
    meta: dict of run metadata, written as the JSON's "meta" section. Its `score_convention` says
      what the sign of a score means (`circuits.convention`: `metric` for jaxinterp's attribution
      scores, where important edges are negative; `loss`, the default, for EAP-IG's and MIB's).
    neuron_scores: optional Float[ndarray, "sender d_model"]; neuron-level attribution scores (one
      per dimension of a node's output, as EAP-IG's; NaN = unscored), written as the nodes'
      "neurons_scores" in JSON.
    neurons_in_graph: optional Bool[ndarray, "sender d_model"]; a neuron circuit's mask (EAP-IG's
      "neurons"): the output dimensions kept live (`levels.evaluate_neuron_circuits`).
  """

  def __init__(self, cfg: Any, scores: np.ndarray | None = None,
               in_graph: np.ndarray | None = None, nodes_in_graph: np.ndarray | None = None,
               node_attribution: np.ndarray | None = None,
               meta: Mapping[str, Any] | None = None,
               neuron_scores: np.ndarray | None = None,
               neurons_in_graph: np.ndarray | None = None):
    self.cfg = cfg
    self._layout = layout.layout_for(layout.shape_key(cfg))
    L = self._layout
    shape = (L.n_senders, L.n_receivers)
    if scores is None:
      self.scores = np.zeros(shape, np.float32)
    else:
      scores = np.asarray(scores)
      if scores.shape != shape:
        raise GraphError(f"scores have shape {scores.shape}, expected {shape} (senders, receivers)")
      if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise GraphError(f"scores must be real numbers, got dtype {scores.dtype}")
      with np.errstate(over="ignore", invalid="ignore"):
        scores = np.where(L.valid, scores, 0).astype(np.float32)
      bad = ~np.isfinite(scores)
      if bad.any():
        names = [self.edge_name(int(s), int(r)) for s, r in zip(*np.nonzero(bad), strict=True)]
        raise GraphError(f"{len(names)} edge score(s) are NaN or infinite: "
                         f"{layout.list_some(names)}")
      self.scores = scores
    if in_graph is None:
      self.in_graph = np.zeros(shape, bool)
    else:
      in_graph = np.asarray(in_graph)
      if in_graph.shape != shape or in_graph.dtype != bool:
        raise GraphError(f"in_graph must be a bool array of shape {shape}, got {in_graph.dtype} "
                         f"{in_graph.shape}")
      bad = in_graph & ~L.valid
      if bad.any():
        raise GraphError(f"in_graph marks {int(bad.sum())} edge(s) that do not exist in this model")
      self.in_graph = in_graph.copy()
    if nodes_in_graph is None:
      self.nodes_in_graph = self._nodes_from_edges(self.in_graph)
    else:
      nodes_in_graph = np.asarray(nodes_in_graph)
      if nodes_in_graph.shape != (L.n_senders,) or nodes_in_graph.dtype != bool:
        raise GraphError(f"nodes_in_graph must be a bool array of shape ({L.n_senders},)")
      self.nodes_in_graph = nodes_in_graph.copy()
    if node_attribution is not None:
      node_attribution = np.asarray(node_attribution, np.float32)
      if node_attribution.shape != (L.n_senders,):
        raise GraphError(f"node_attribution must have shape ({L.n_senders},)")
      if np.isinf(node_attribution).any():
        raise GraphError("node_attribution contains infinite values")
      node_attribution = node_attribution.copy()
    self.node_attribution = node_attribution
    self.meta: dict[str, Any] = dict(meta or {})
    self.neuron_scores = self.neurons_in_graph = None
    for name, x, dtype in (("neuron_scores", neuron_scores, np.float32),
                           ("neurons_in_graph", neurons_in_graph, bool)):
      if x is not None:
        x = np.array(x, dtype)
        if x.ndim != 2 or x.shape[0] != L.n_senders:
          raise GraphError(f"{name} must have shape ({L.n_senders}, d_model), got {x.shape}")
        if dtype is np.float32 and np.isinf(x).any():
          raise GraphError(f"{name} contains infinite values")
        setattr(self, name, x)

  # -- construction --------------------------------------------------------------------------------

  @classmethod
  def from_config(cls, cfg: Any, scores: np.ndarray | None = None,
                  score_convention: str | None = None) -> Graph:
    """An empty circuit over `cfg`'s graph, optionally with edge scores `[n_senders, n_receivers]`.

    `score_convention` (recorded in `meta`) says what the scores' sign means: `metric` for
    `attribution.attribute` scores of a higher-is-better metric (`convention.for_task(task)`),
    `loss` (the default) for EAP-IG's and MIB's.
    """
    meta = (None if score_convention is None
            else {convention.KEY: convention.check(score_convention)})
    return cls(cfg, scores=scores, meta=meta)

  def copy(self) -> Graph:
    return Graph(self.cfg, self.scores, self.in_graph, self.nodes_in_graph, self.node_attribution,
                 self.meta, self.neuron_scores, self.neurons_in_graph)

  def replace(self, **changes: Any) -> Graph:
    """A new graph with some constructor fields changed, the others as in this graph.

    Fields: `cfg`, `scores`, `in_graph`, `nodes_in_graph`, `node_attribution`, `meta`,
    `neuron_scores`, `neurons_in_graph`. The new graph
    is validated and copies its arrays, as the constructor does. Changing `in_graph` keeps this
    graph's `nodes_in_graph` unless that is given too (`nodes_in_graph=None` derives the nodes from
    the new edges).
    """
    fields = {"cfg": self.cfg, "scores": self.scores, "in_graph": self.in_graph,
              "nodes_in_graph": self.nodes_in_graph, "node_attribution": self.node_attribution,
              "meta": self.meta, "neuron_scores": self.neuron_scores,
              "neurons_in_graph": self.neurons_in_graph}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
      raise GraphError(f"replace: {unknown} are not Graph fields; fields are {list(fields)}")
    fields.update(changes)
    return Graph(**fields)

  def with_edges(self, mask: np.ndarray, prune: bool = False) -> Graph:
    """A graph with these scores whose circuit is the valid edges of `mask` (nodes derived from
    it)."""
    mask = np.asarray(mask, bool)
    if mask.shape != self.valid.shape:
      raise GraphError(f"edge mask has shape {mask.shape}, expected {self.valid.shape}")
    g = Graph(self.cfg, self.scores, mask & self.valid, None, self.node_attribution, self.meta,
              self.neuron_scores, self.neurons_in_graph)
    return g.prune() if prune else g

  def full(self) -> Graph:
    """The whole model: every valid edge and node in the graph."""
    return self.with_edges(self.valid)

  def empty(self) -> Graph:
    """The empty circuit (every edge ablated)."""
    return self.with_edges(np.zeros_like(self.valid))

  # -- layout --------------------------------------------------------------------------------------

  @property
  def layout(self) -> layout.Layout:
    """The immutable names, validity and node maps of this graph's shape (shared between graphs)."""
    return self._layout

  @property
  def valid(self) -> np.ndarray:
    return self._layout.valid

  @property
  def n_senders(self) -> int:
    return self._layout.n_senders

  @property
  def n_receivers(self) -> int:
    return self._layout.n_receivers

  @property
  def n_nodes(self) -> int:
    """Senders plus `logits` (158 for GPT-2 small)."""
    return self._layout.n_senders + 1

  @property
  def n_edges(self) -> int:
    """Number of valid edges in the model (32,491 for GPT-2 small)."""
    return self._layout.n_edges

  @property
  def sender_names(self) -> tuple[str, ...]:
    return self._layout.sender_names

  @property
  def receiver_names(self) -> tuple[str, ...]:
    return self._layout.receiver_names

  @property
  def node_names(self) -> tuple[str, ...]:
    return self._layout.node_names

  @property
  def receiver_node(self) -> np.ndarray:
    """Int[ndarray, "receiver"]: node index owning each receiver (`n_senders` for logits)."""
    return self._layout.receiver_node

  def edge_name(self, sender: int, receiver: int) -> str:
    """EAP-IG name of edge (sender, receiver), e.g. `a0.h1->a3.h2<q>`."""
    return self._layout.edge_name(sender, receiver)

  def ranked_edges(self, k: int | None = None, absolute: bool = True) -> list[tuple[str, float]]:
    """The valid edges as (name, score), best first by |score| (or signed score); the top `k`."""
    order = selection.ranked(np.where(self.valid, self.scores, np.nan), absolute=absolute,
                             score_convention=self.score_convention)[:k]
    s_idx, r_idx = np.divmod(order, self.n_receivers)
    return [(self.edge_name(int(s), int(r)), float(self.scores[s, r]))
            for s, r in zip(s_idx, r_idx, strict=True)]

  def edge_index(self, name: str) -> tuple[int, int]:
    """(sender, receiver) of an EAP-IG edge name; GraphError for names that are not edges here."""
    return self._layout.edge_index(name)

  def node_index(self, name: str) -> int:
    """Node index of `input`, `a{l}.h{h}`, `m{l}` or `logits` (= `n_senders`)."""
    return self._layout.node_index(name)

  def _describe(self) -> str:
    return self._layout.describe()

  def __repr__(self) -> str:
    return (f"Graph({self._describe()}, edges {self.count_edges()}/{self.n_edges}, "
            f"nodes {self.count_nodes()}/{self.n_nodes})")

  # -- circuit state -------------------------------------------------------------------------------

  def count_edges(self) -> int:
    """Edges in the circuit."""
    return int(self.in_graph.sum())

  def count_nodes(self) -> int:
    """Nodes in the circuit, `logits` included."""
    return int(self.nodes_in_graph.sum()) + 1

  def receivers_in_graph(self) -> np.ndarray:
    """Bool[ndarray, "receiver"]: whether each receiver's node is in the circuit (logits always)."""
    return np.append(self.nodes_in_graph, True)[self.receiver_node]

  def edge_weights(self, dtype=np.float32) -> np.ndarray:
    """Float[ndarray, "sender receiver"]: 1 for circuit edges, 0 otherwise (`EdgePatch.weights`)."""
    return self.in_graph.astype(dtype)

  def _nodes_from_edges(self, mask: np.ndarray) -> np.ndarray:
    """EAP-IG's node rule: an in-graph outgoing edge and an in-graph incoming edge (input
    exempt)."""
    return self._layout.nodes_from_edges(mask)

  # -- node scores ---------------------------------------------------------------------------------

  @property
  def score_convention(self) -> str:
    """`metric` or `loss`: what the sign of the scores means (`circuits.convention`)."""
    return convention.of(self.meta)

  def importance(self) -> np.ndarray:
    """Float[ndarray, "sender receiver"]: the signed scores oriented so that higher means more
    important (scores negated in the `metric` convention); signed selection ranks by this."""
    return self.scores * np.float32(convention.importance_sign(self.score_convention))

  def node_scores(self, absolute: bool = True) -> np.ndarray:
    """Float[ndarray, "sender"]: each node's summed outgoing valid-edge scores.

    With `absolute=True` (default) the sum of |score| over the node's outgoing edges (how much the
    node matters through any path); with `absolute=False` the signed sum. `logits` has no outgoing
    edges and no entry. Node-level attribution scores, when available, are in `node_attribution`.
    """
    key = selection.ranking_key(self, absolute)
    return np.where(self.valid, key, 0).sum(axis=1, dtype=np.float64).astype(np.float32)

  # -- selection (`circuits.selection`) ------------------------------------------------------------

  def top_n(self, n: int, absolute: bool = True, prune: bool = True,
            level: str = "edge") -> Graph:
    """`selection.top_n`: the `n` best-scoring edges (or nodes, or neurons: `level`), then
    optionally pruned."""
    return selection.top_n(self, n, level=level, absolute=absolute, prune=prune)

  def threshold(self, t: float, absolute: bool = True, prune: bool = True) -> Graph:
    """`selection.threshold`: every valid edge whose (absolute) score is `>= t`."""
    return selection.threshold(self, t, absolute=absolute, prune=prune)

  def greedy(self, n: int, absolute: bool = True, prune: bool = True) -> Graph:
    """`selection.greedy`: EAP-IG's greedy growth from the logits, `n` edges."""
    return selection.greedy(self, n, absolute=absolute, prune=prune)

  def prune(self) -> Graph:
    """`selection.prune`: only the edges on some input -> logits path of the circuit."""
    return selection.prune(self)

  # -- files (`circuits.io`) -----------------------------------------------------------------------

  def to_dict(self, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`io.to_dict`: the EAP-IG JSON structure, every valid edge with its score, plus `meta`."""
    return io.to_dict(self, meta)

  def to_json(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> None:
    """`io.to_json`: write EAP-IG `graph.json` atomically."""
    io.to_json(self, path, meta)

  @classmethod
  def from_json(cls, path: str | os.PathLike, cfg: Any = None,
                require_all_edges: bool = False) -> Graph:
    """`io.from_json`: read an EAP-IG graph JSON (ours or EAP-IG's, old or new format)."""
    return io.from_json(cls, path, cfg, require_all_edges)

  @classmethod
  def from_dict(cls, d: Any, cfg: Any = None, require_all_edges: bool = False) -> Graph:
    """`io.from_dict`: build a graph from a parsed EAP-IG JSON structure."""
    return io.from_dict(cls, d, cfg, require_all_edges)

  def to_npz(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> None:
    """`io.to_npz`: write the matrices as an `.npz`, atomically."""
    io.to_npz(self, path, meta)

  @classmethod
  def from_npz(cls, path: str | os.PathLike, cfg: Any = None) -> Graph:
    """`io.from_npz`: read a graph written by `to_npz`."""
    return io.from_npz(cls, path, cfg)
