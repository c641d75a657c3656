"""Ground-truth circuits, and how well an attribution method recovers them (AUROC).

**tracr models.** tracr compiles a RASP program into a transformer whose residual stream is a direct
sum of one subspace per SOp, each spanned by named basis directions (`tokens:a`, `indices:2`, `one`,
`frac_prevs`, ...). The port (`models.from_tracr`) keeps that basis. For every node of the EAP-IG
graph the weights say exactly which residual directions it writes and which each of its
inputs reads:

- writes: `input` the directions its token or position embedding is nonzero on (`tokens:*`,
  `indices:*`, `one`); head `a{l}.h{h}` the nonzero columns of `W_O[h]`; MLP `m{l}` the nonzero
  columns of `W_out` (and of `b_out`);
- reads: a head's `<q>`, `<k>`, `<v>` input the nonzero rows of `W_Q[h]`, `W_K[h]`, `W_V[h]`; an
  MLP the nonzero rows of `W_in`; `logits` the output SOp's directions (the rows of `W_U`).

(Nonzero: |w| > `WEIGHT_TOL`. tracr writes exact zeros everywhere else.) **An edge s -> r is true
iff it is a valid edge of the graph and some residual direction is both written by s and read by
r**: the written and read subspaces overlap. tracr writes every SOp once, and a component reads
exactly the SOps its RASP operation depends on (plus the `one` direction as a bias, and `tokens:BOS`
through the keys of every categorical head, which always attends to BOS a little and falls back to
it), so the true edges are the dependencies the program actually uses. Padded heads and empty MLP
layers read and write nothing: they have no true edge. `tracr_circuit` returns this as a `Graph`
whose `in_graph` edges are the true ones; its `meta["sops"]` names the SOps each true edge carries.
A node is true iff it has a true outgoing edge.

**Edges that patching cannot see.** Some true edges carry only information that is identical in the
clean and the corrupted run as their receiver reads it: positions (`indices`), the `one` direction,
`tokens:BOS`, SOps computed from those only (`length`, when both prompts have the same length, as
aligned patching pairs do), or tokens read by a selector that selects every key anyway. Ablating
such an edge changes nothing, so every patching method must give it score 0. `visible_edges` finds
them from the data, for the ablation used: **a true edge s -> r is visible iff ablating it alone
changes the output of r's node** (the head's result, the MLP's output, the logits) **by more than
`VISIBLE_TOL` at some input position of some example** (BOS's position is not one: tracr computes no
SOp there, and documents its outputs at BOS as meaningless). The benchmark (`evaluate`) then counts:

- true and visible edges as positives; every valid edge that is not true as a negative;
- invisible true edges not at all (neither positive nor negative); the same for nodes (a true node
  counts when one of its true outgoing edges is visible);
- and, since zero ablation of every sender sees what patching cannot (it removes `one`, BOS and the
  positions too), the benchmark (`recovery.benchmark`) also scores every method that supports it
  with `intervention="zero-all"`, visibility computed the same way for that ablation. (`"zero"`
  follows EAP-IG and keeps the position embedding: the positional edges stay invisible to it.)

A visible edge may still leave the metric unchanged (its receiver's change is undone downstream, or
lands on outputs that are equal for these inputs); such an edge stays a positive, and costs every
method, `exact` included, some AUROC.

**Ranking.** Edges are ranked by |score|. Scores below `ZERO_FLOOR` (1e-5) times the larger of the
method's largest |score| and the clean metric count as exactly 0 (ties): that is float32 noise
(`exact` subtracts two separately computed metric sums) or a gradient through a saturated softmax,
not a finding; every non-edge of a tracr model scores 0 in its axis-aligned subspaces, and a
1e-12 would otherwise outrank them. AUROC is the Mann-Whitney statistic with ties counted half
(`auroc`); node scores are the sums of |edge score| over a node's outgoing edges
(`Graph.node_scores`).

**The bundled toy model** (`jaxinterp/assets/toy`) is trained, not compiled: `toy_circuit` is its
documented induction circuit (README, `toy.toy_metadata()`), not a weight overlap.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp import attribution
from jaxinterp.circuits import Graph
from jaxinterp.groundtruth import toy
from jaxinterp.models import edges as E
from jaxinterp.models import tracr as T
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward
from jaxinterp.tasks import Dataset

WEIGHT_TOL = 1e-9  # |w| above this reads or writes a direction
VISIBLE_TOL = 1e-3  # a receiver's output changing by more (tracr's values are O(1)) is visible
ZERO_FLOOR = 1e-5  # |score| below this fraction of the score scale ranks as 0 (see ranking_key)


class GroundTruthError(ValueError):
  """A model whose ground truth cannot be derived (e.g. one with layer norm)."""


# ------------------------------------------------------------------------------ subspace overlap


def _nonzero_rows(w) -> np.ndarray:
  w = np.abs(np.asarray(w, np.float64))
  return w.reshape(w.shape[0], -1).max(1) > WEIGHT_TOL


def reads_writes(cfg: ModelConfig, params) -> tuple[np.ndarray, np.ndarray]:
  """Which residual directions each node writes and each receiver reads.

  Returns (writes Bool[ndarray, "sender d_model"], reads Bool[ndarray, "receiver d_model"]) in the
  layout of `models.edges`. Only meaningful without normalisation (the residual basis is read
  directly); GroundTruthError otherwise.
  """
  if cfg.normalization != "none":
    raise GroundTruthError(f"subspace ground truth needs a model without normalisation (tracr); "
                           f"this one has {cfg.normalization}")
  d, H = cfg.d_model, cfg.n_heads
  writes = np.zeros((E.n_senders(cfg), d), bool)
  reads = np.zeros((E.n_receivers(cfg), d), bool)
  writes[0] = _nonzero_rows(np.asarray(params["W_E"]).T)
  if "W_pos" in params:
    writes[0] |= _nonzero_rows(np.asarray(params["W_pos"]).T)
  for layer in range(cfg.n_layers):
    attn, mlp = params[f"blocks_{layer}"]["attn"], params[f"blocks_{layer}"]["mlp"]
    for h in range(H):
      writes[E.head_sender(cfg, layer, h)] = _nonzero_rows(np.asarray(attn["W_O"][h]).T)
      for c in "qkv":
        kv = h // (H // cfg.kv_heads) if c != "q" else h
        reads[E.head_receiver(cfg, layer, h, c)] = _nonzero_rows(attn[f"W_{c.upper()}"][kv])
    out = _nonzero_rows(np.asarray(mlp["W_out"]).T)
    if "b_out" in mlp:
      out |= np.abs(np.asarray(mlp["b_out"])) > WEIGHT_TOL
    writes[E.mlp_sender(cfg, layer)] = out
    reads[E.mlp_receiver(cfg, layer)] = _nonzero_rows(mlp["W_in"])
  reads[E.logits_receiver(cfg)] = _nonzero_rows(params["W_U"])
  return writes, reads


def subspace_circuit(cfg: ModelConfig, params, labels: tuple[str, ...] | None = None) -> Graph:
  """The true circuit of an axis-aligned model: valid edges whose written and read directions
  overlap (see the module docstring). With `labels` (a name per residual direction, `sop:value`),
  `meta["sops"]` maps each true edge to the SOps it carries."""
  writes, reads = reads_writes(cfg, params)
  overlap = writes.astype(np.int32) @ reads.T.astype(np.int32) > 0  # [sender, receiver]
  g = Graph.from_config(cfg)
  g = g.with_edges(overlap & g.valid)
  g.meta["definition"] = ("true edge: a valid edge whose sender writes a residual direction its "
                          "receiver reads (jaxinterp.groundtruth.truth)")
  if labels is not None:
    sops = {}
    for s, r in zip(*np.nonzero(g.in_graph), strict=True):
      shared = sorted({labels[i].split(":")[0] for i in np.flatnonzero(writes[s] & reads[r])})
      sops[g.edge_name(int(s), int(r))] = shared
    g.meta["sops"] = sops
  return g


def tracr_circuit(assembled_model) -> Graph:
  """The true circuit of a tracr-compiled model, over the graph of its port.

  Args:
    assembled_model: what `tracr.compiler.compiling.compile_rasp_to_model` returns, or its port
      (`models.from_tracr(...)`, a `TracrModel`).

  Returns:
    A `Graph` over the port's config whose `in_graph` edges are the true ones and whose nodes are
    those with a true outgoing edge (`logits` always); `meta["sops"]` names the SOps each carries.
  """
  m = (assembled_model if isinstance(assembled_model, T.TracrModel)
       else T.from_tracr(assembled_model))
  g = subspace_circuit(m.cfg, m.params, m.encoding.residual_labels)
  return g.replace(nodes_in_graph=true_nodes(g))


def true_nodes(truth: Graph) -> np.ndarray:
  """Bool[ndarray, "sender"]: nodes with a true outgoing edge (the input node included if it
  has)."""
  return truth.in_graph.any(1)


def toy_circuit(cfg: Any = None) -> Graph:
  """The bundled toy model's documented induction circuit (all of it, before visibility).

  The previous-token head `a0.h3` reads positions through q and k and the previous token through v;
  it K-composes into the induction head `a1.h0`, whose query reads the current token, whose value
  reads the tokens it copies, and which writes the answer to the logits:
  `input->a0.h3<q>`, `input->a0.h3<k>`, `input->a0.h3<v>`, `a0.h3->a1.h0<k>`, `input->a1.h0<q>`,
  `input->a1.h0<v>`, `a1.h0->logits` (heads from `toy.toy_metadata()`).
  """
  meta = toy.toy_metadata()
  (lp, hp), (li, hi) = meta["prev_token_head"], meta["induction_head"]
  if cfg is None:
    cfg = toy.load_toy().cfg
  prev, ind = f"a{lp}.h{hp}", f"a{li}.h{hi}"
  g = Graph.from_config(cfg)
  mask = np.zeros_like(g.valid)
  for name in toy_edges(prev, ind):
    mask[g.edge_index(name)] = True
  out = g.with_edges(mask)
  out.meta["definition"] = "the documented induction circuit of the bundled toy model"
  return out.replace(nodes_in_graph=true_nodes(out))


def toy_edges(prev: str, ind: str) -> list[str]:
  """The edge names of the toy induction circuit for a previous-token and an induction head."""
  return [f"input->{prev}<q>", f"input->{prev}<k>", f"input->{prev}<v>", f"{prev}->{ind}<k>",
          f"input->{ind}<q>", f"input->{ind}<v>", f"{ind}->logits"]


def toy_invisible(truth: Graph) -> np.ndarray:
  """The toy circuit's edges that patching with `toy.induction_dataset(corrupt="first_half")`
  cannot see: the previous-token head's positional q and k, and the induction head's query, whose
  token at the read position is the same in both prompts. Bool[ndarray, "sender receiver"]."""
  out = np.zeros_like(truth.valid)
  for s, r in zip(*np.nonzero(truth.in_graph), strict=True):
    name = truth.edge_name(int(s), int(r))
    if name.startswith("input->") and (name.endswith("<q>") or name.endswith("<k>")):
      out[s, r] = True
  return out


# ------------------------------------------------------------------------------------ visibility


def receiver_nodes(cfg: ModelConfig) -> np.ndarray:
  """Int[ndarray, "receiver"]: the node each receiver feeds, numbered heads `l*H + h`, then MLPs
  `L*H + l`, then logits `L*H + L` (the order of `_node_outputs`)."""
  L, H = cfg.n_layers, cfg.n_heads
  out = np.full(E.n_receivers(cfg), L * H + L)
  for layer in range(L):
    for h in range(H):
      for c in "qkv":
        out[E.head_receiver(cfg, layer, h, c)] = layer * H + h
    out[E.mlp_receiver(cfg, layer)] = L * H + layer
  return out


def _node_outputs(cfg: ModelConfig, params, batch, weights, ablated, first: int = 0) -> list:
  """The receiving nodes' outputs in the graph-form forward, zero outside real tokens and before
  position `first`: per layer the heads' results `[b, p, H, d]`, then per layer the MLP output,
  then the logits (`[b, p, 1, .]`)."""
  L = cfg.n_layers
  sites = [f"blocks.{layer}.attn.hook_result" for layer in range(L)]
  sites += [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
  logits, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                          edges=E.EdgePatch(weights, ablated), collect=tuple(sites))
  parts = [cache[n] for n in sites[:L]] + [cache[n][:, :, None] for n in sites[L:]]
  keep = batch.mask & batch.valid[:, None] & (jnp.arange(batch.mask.shape[1]) >= first)[None]
  keep = keep[:, :, None, None]
  return [jnp.where(keep, x, 0.0) for x in parts + [logits[:, :, None]]]


def visible_edges(cfg: ModelConfig, params, truth: Graph, dataset: Dataset,
                  intervention: str = "patching", batch_size: int = 64,
                  first: int = 1) -> np.ndarray:
  """Bool[ndarray, "sender receiver"]: the true edges whose ablation, alone, changes the output of
  their receiver's node (head result, MLP output or logits) by more than VISIBLE_TOL at some real
  position from `first` on, of some example. The others carry information that is the same in the
  clean and the ablated run as the receiver reads it (positions, `one`, BOS, a constant `length`, a
  selector that selects everything): no method can see them with this ablation. `first=1` skips
  BOS's position: tracr computes no SOp there (its output at BOS is meaningless by design)."""
  abl = attribution.make_ablation(cfg, params, dataset, intervention, batch_size)
  edges = np.argwhere(truth.in_graph)
  if not len(edges):
    return np.zeros_like(truth.in_graph)
  node_of = receiver_nodes(cfg)
  ones = jnp.ones((E.n_senders(cfg), E.n_receivers(cfg)), jnp.float32)

  @jax.jit
  def changes(batch, s, r):
    ablated = abl.values(cfg, params, batch)
    base = _node_outputs(cfg, params, batch, ones, ablated, first)

    def one(si, ri):
      outs = _node_outputs(cfg, params, batch, ones.at[si, ri].set(0.0), ablated, first)
      return jnp.concatenate([abs(a - b).max((0, 1, 3)) for a, b in zip(outs, base, strict=True)])

    return jax.vmap(one)(s, r)

  worst = np.zeros(len(edges))
  for batch in dataset.batches(batch_size, bucket=None):
    d = np.asarray(changes(batch, jnp.asarray(edges[:, 0]), jnp.asarray(edges[:, 1])))
    worst = np.maximum(worst, d[np.arange(len(edges)), node_of[edges[:, 1]]])
  out = np.zeros_like(truth.in_graph)
  out[edges[:, 0], edges[:, 1]] = worst > VISIBLE_TOL
  return out


# ----------------------------------------------------------------------------------------- AUROC


def auroc(scores, labels, mask=None) -> float:
  """Area under the ROC curve of `scores` for the binary `labels` (numpy; ties count half).

  Equals the probability that a random positive scores above a random negative, ties counted 1/2
  (Mann-Whitney U / (n_pos * n_neg), with average ranks for ties). `mask` selects the entries that
  count. NaN when there is no positive or no negative.
  """
  s = np.asarray(scores, np.float64).ravel()
  y = np.asarray(labels, bool).ravel()
  if s.shape != y.shape:
    raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
  if mask is not None:
    keep = np.asarray(mask, bool).ravel()
    s, y = s[keep], y[keep]
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
  ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average 1-based ranks
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def ranking_key(scores: np.ndarray, scale: float = 0.0) -> np.ndarray:
  """|scores|, with those at most ZERO_FLOOR * max(largest |score|, |scale|) set to exactly 0
  (`scale`: the clean metric, the size of the numbers the scores are differences of)."""
  a = np.abs(np.asarray(scores, np.float64))
  top = max(a.max() if a.size else 0.0, abs(float(scale)))
  return np.where(a > ZERO_FLOOR * top, a, 0.0)


def evaluate(truth: Graph, scores: np.ndarray, visible: np.ndarray | None = None,
             scale: float = 0.0) -> dict:
  """Edge- and node-level AUROC of edge `scores` against `truth`.

  Args:
    truth: the true circuit (`in_graph`).
    scores: Float[ndarray, "sender receiver"], a method's edge scores.
    visible: Bool[ndarray, "sender receiver"], the true edges this ablation can see (None: all);
      the others are left out, and so are true nodes none of whose true edges is visible.
    scale: the clean metric, for `ranking_key`'s zero floor.

  Returns:
    {"edge_auroc", "node_auroc" (None where undefined: no positive or no negative counts),
    "n_true_edges", "n_visible_edges", "n_edges", "n_found_edges"
    (visible true edges ranked above 0), "n_true_nodes", "n_visible_nodes", "n_nodes"}.
  """
  valid = truth.valid
  pos = truth.in_graph
  vis = pos if visible is None else (np.asarray(visible, bool) & pos)
  key = np.where(valid, ranking_key(np.where(valid, scores, 0.0), scale), 0.0)
  counted = valid & (vis | ~pos)
  node_true = pos.any(1)
  node_vis = vis.any(1)
  node_key = truth.replace(scores=key).node_scores(absolute=True)
  node_counted = node_vis | ~node_true
  return {
      "edge_auroc": _or_none(auroc(key, vis, counted)),
      "node_auroc": _or_none(auroc(node_key, node_vis, node_counted)),
      "n_true_edges": int(pos.sum()), "n_visible_edges": int(vis.sum()),
      "n_edges": int(valid.sum()),
      "n_found_edges": int((vis & (key > 0)).sum()),
      "n_true_nodes": int(node_true.sum()), "n_visible_nodes": int(node_vis.sum()),
      "n_nodes": int(node_true.size),
  }


def _or_none(x: float) -> float | None:
  return None if np.isnan(x) else x
