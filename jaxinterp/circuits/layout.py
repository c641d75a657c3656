"""The EAP-IG edge layout of a model shape: node and edge names, validity, and name parsing.

A graph's matrices are dense `[n_senders, n_receivers]` over the index layout of `models/edges.py`
(the layout of EAP-IG's `graph.py`):

- senders (EAP-IG "forward" nodes): `input`, every head `a{l}.h{h}` (its `hook_result`) and every
  MLP `m{l}`;
- receivers (EAP-IG "backward" nodes): the q, k and v input of every head (`a{l}.h{h}<q>` ...),
  every MLP input `m{l}` and the `logits` input.

Nodes are the senders plus `logits`: `n_nodes = n_senders + 1` (158 for GPT-2 small); node
`i < n_senders` is sender `i` and `logits` is node `n_senders`. Edge names are EAP-IG's:
`a0.h1->a3.h2<q>`, `input->m0`, `m2->logits`. An edge is *valid* when its sender is upstream of its
receiver: heads of layer l read the input and all earlier layers; the MLP of layer l also reads its
own layer's heads in sequential blocks but not in parallel (GPT-NeoX) blocks; the logits read every
sender. GQA models are ungrouped (one q, k and v receiver per query head). GPT-2 small has 32,491
valid edges.

One `Layout` per shape is built once and cached (`layout_for`); it is immutable and shared by every
graph of that shape. This module also holds `GraphError`, raised by the whole `circuits` package,
and the small argument checks the other modules share.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxinterp.models import edges as E

# "Float[ndarray, 'sender receiver']" style shape comments below refer to numpy arrays.

_LIST_IN_ERRORS = 10


class GraphError(ValueError):
  """A graph, graph file or evaluation input that jaxinterp cannot use."""


@dataclasses.dataclass(frozen=True)
class GraphShape:
  """The part of a model config a graph needs; used when a graph file is read without a model
  config.

  Any object with `n_layers`, `n_heads` and `parallel_attn_mlp` attributes (a `models.ModelConfig`
  included) can stand in for a model config in this package.
  """

  n_layers: int
  n_heads: int
  parallel_attn_mlp: bool = False
  d_model: int | None = None


# --------------------------------------------------------------------------------------------------
# Layout (cached per shape)
# --------------------------------------------------------------------------------------------------


def shape_key(cfg: Any) -> tuple[int, int, bool]:
  try:
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    parallel = getattr(cfg, "parallel_attn_mlp", False)
  except AttributeError as e:
    raise GraphError(
        f"a graph needs a config with n_layers and n_heads, got {type(cfg).__name__}") from e
  for name, v in (("n_layers", n_layers), ("n_heads", n_heads)):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
      raise GraphError(f"config {name} must be a positive integer, got {v!r}")
  if not isinstance(parallel, (bool, np.bool_)):
    raise GraphError(f"config parallel_attn_mlp must be a bool, got {parallel!r}")
  return int(n_layers), int(n_heads), bool(parallel)


class Layout:
  """Names, validity and node maps of one graph shape (immutable, shared between graphs)."""

  def __init__(self, n_layers: int, n_heads: int, parallel: bool):
    shape = GraphShape(n_layers, n_heads, parallel)
    self.n_layers, self.n_heads, self.parallel = n_layers, n_heads, parallel
    S, R = E.n_senders(shape), E.n_receivers(shape)
    self.n_senders, self.n_receivers = S, R
    self.logits_receiver = E.logits_receiver(shape)

    sender_names = [""] * S
    sender_names[0] = "input"
    receiver_names = [""] * R
    receiver_node = np.zeros(R, np.int64)  # node index owning each receiver; logits is node S
    valid = np.zeros((S, R), bool)
    for li in range(n_layers):
      n_attn, n_mlp = E.n_upstream_of_attn(shape, li), E.n_upstream_of_mlp(shape, li)
      for h in range(n_heads):
        s = E.head_sender(shape, li, h)
        sender_names[s] = f"a{li}.h{h}"
        for qkv in "qkv":
          r = E.head_receiver(shape, li, h, qkv)
          receiver_names[r] = f"a{li}.h{h}<{qkv}>"
          receiver_node[r] = s
          valid[:n_attn, r] = True
      s, r = E.mlp_sender(shape, li), E.mlp_receiver(shape, li)
      sender_names[s] = receiver_names[r] = f"m{li}"
      receiver_node[r] = s
      valid[:n_mlp, r] = True
    receiver_names[self.logits_receiver] = "logits"
    receiver_node[self.logits_receiver] = S
    valid[:, self.logits_receiver] = True
    valid.flags.writeable = False
    receiver_node.flags.writeable = False

    self.sender_names = tuple(sender_names)
    self.receiver_names = tuple(receiver_names)
    self.node_names = self.sender_names + ("logits",)
    self.sender_index = {n: i for i, n in enumerate(self.sender_names)}
    self.receiver_index = {n: i for i, n in enumerate(self.receiver_names)}
    self.valid = valid
    self.receiver_node = receiver_node
    self.n_edges = int(valid.sum())
    # receivers_of[node] -> receiver indices whose inputs belong to that node (empty for input).
    self.receivers_of = [np.flatnonzero(receiver_node == i) for i in range(S + 1)]

  @functools.cached_property
  def eap_order(self) -> tuple[np.ndarray, np.ndarray]:
    """(senders, receivers) of every valid edge in the order EAP-IG's `Graph.from_model` adds
    them."""
    shape = GraphShape(self.n_layers, self.n_heads, self.parallel)
    ss, rs = [], []
    for li in range(self.n_layers):
      n_attn = E.n_upstream_of_attn(shape, li)
      heads = np.array([[E.head_receiver(shape, li, h, q) for q in "qkv"]
                        for h in range(self.n_heads)])
      s, r = np.meshgrid(np.arange(n_attn), heads.ravel(), indexing="ij")
      ss.append(s.ravel())
      rs.append(r.ravel())
      n_mlp = E.n_upstream_of_mlp(shape, li)
      ss.append(np.arange(n_mlp))
      rs.append(np.full(n_mlp, E.mlp_receiver(shape, li)))
    ss.append(np.arange(self.n_senders))
    rs.append(np.full(self.n_senders, self.logits_receiver))
    return np.concatenate(ss), np.concatenate(rs)

  def describe(self) -> str:
    """The shape, as error messages name it: `n_layers=2, n_heads=4, parallel_attn_mlp=False`."""
    return f"n_layers={self.n_layers}, n_heads={self.n_heads}, parallel_attn_mlp={self.parallel}"

  # -- names from indices, and back ----------------------------------------------------------------

  def edge_name(self, sender: int, receiver: int) -> str:
    """EAP-IG name of edge (sender, receiver), e.g. `a0.h1->a3.h2<q>`; GraphError if not an edge."""
    if not (0 <= sender < self.n_senders and 0 <= receiver < self.n_receivers):
      raise GraphError(f"edge index ({sender}, {receiver}) is out of range")
    if not self.valid[sender, receiver]:
      raise GraphError(f"({sender}, {receiver}) = {self.sender_names[sender]}->"
                       f"{self.receiver_names[receiver]} is not an edge of this model")
    return f"{self.sender_names[sender]}->{self.receiver_names[receiver]}"

  def parse_edge(self, name: Any) -> tuple[int, int] | None:
    """(sender, receiver) of a valid edge name, or None."""
    if not isinstance(name, str):
      return None
    parent, sep, child = name.partition("->")
    if not sep:
      return None
    s, r = self.sender_index.get(parent), self.receiver_index.get(child)
    if s is None or r is None or not self.valid[s, r]:
      return None
    return s, r

  def edge_index(self, name: str) -> tuple[int, int]:
    """(sender, receiver) of an EAP-IG edge name; GraphError for names that are not edges here."""
    idx = self.parse_edge(name)
    if idx is None:
      raise GraphError(f"{name!r} is not an edge of this model ({self.describe()})")
    return idx

  def node_index(self, name: str) -> int:
    """Node index of `input`, `a{l}.h{h}`, `m{l}` or `logits` (= `n_senders`)."""
    if name == "logits":
      return self.n_senders
    i = self.sender_index.get(name)
    if i is None:
      raise GraphError(f"{name!r} is not a node of this model ({self.describe()})")
    return i

  # -- nodes from edges ----------------------------------------------------------------------------

  def nodes_from_edges(self, mask: np.ndarray) -> np.ndarray:
    """EAP-IG's node rule: an in-graph outgoing edge and an in-graph incoming edge (input exempt).

    `mask` is Bool[ndarray, "sender receiver"]; returns Bool[ndarray, "sender"].
    """
    outgoing = mask.any(axis=1)
    incoming = np.bincount(self.receiver_node, weights=mask.any(axis=0),
                           minlength=self.n_senders + 1)
    incoming = incoming[:self.n_senders] > 0
    incoming[0] = True
    return outgoing & incoming


@functools.lru_cache(maxsize=32)
def layout_for(key: tuple[int, int, bool]) -> Layout:
  return Layout(*key)


def valid_edges(cfg: Any) -> np.ndarray:
  """Bool [n_senders, n_receivers]: which sender->receiver pairs of `cfg`'s graph are real edges (a
  fresh copy the caller may write to)."""
  return layout_for(shape_key(cfg)).valid.copy()


# --------------------------------------------------------------------------------------------------
# Argument checks and error formatting shared by the package
# --------------------------------------------------------------------------------------------------


def check_count(n: Any, upper: int, what: str) -> int:
  if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
    raise GraphError(f"{what} must be an integer, got {n!r}")
  if not 0 <= n <= upper:
    raise GraphError(f"{what}={n} is outside [0, {upper}]")
  return int(n)


def list_some(items: Sequence[Any]) -> str:
  shown = ", ".join(repr(x) for x in items[:_LIST_IN_ERRORS])
  more = f" and {len(items) - _LIST_IN_ERRORS} more" if len(items) > _LIST_IN_ERRORS else ""
  return f"[{shown}{more}]"
