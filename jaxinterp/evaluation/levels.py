"""Circuits of nodes and of neurons: top-n selection, evaluation by ablation, faithfulness curves.

Node- and neuron-level attribution (`attribute(..., level="node" | "neuron")`) scores senders
(Float [n_senders]) or each dimension of a sender's output (Float [n_senders, d_model]). Circuits
at those levels follow the `eap` package's `Graph.apply_topn(n, level=...)` and `evaluate_graph`:

- **node circuit**: the n best-scoring nodes (the input node is a node like the others); every valid
  edge between kept nodes (or into the logits) is in, then pruned. Evaluated as an edge circuit:
  every outgoing edge of an excluded node is ablated (`evaluation.evaluate_circuits`).
- **neuron circuit**: the n best-scoring neurons; a node with a kept neuron is kept with all its
  outgoing edges, then pruned, and the neurons of pruned nodes are dropped. Evaluated by ablating
  every excluded output dimension of every sender into all of its receivers (`eap`'s
  `evaluate_graph` with a neuron mask: the edge mask then plays no further role). In the forward
  this is one intervention per sender site, `x -> ablated + keep * (x - ablated)`, at
  `blocks.0.hook_resid_pre` (input), `blocks.{l}.attn.hook_result` (heads) and
  `blocks.{l}.hook_mlp_out` (MLPs): the models' own sites, no new hooks.

Ranking is by |score| (`absolute=True`) or by signed importance (`circuits.convention`), ties
broken by index. Graphs carry the scores in `node_attribution` or `neuron_scores`, and
`circuits.io` writes them in `eap`'s JSON (nodes' `score`, or `neurons` and `neurons_scores`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import flax.struct
import jax
import numpy as np

from jaxinterp import circuits as G
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.attribution.ablation import Ablation, make_ablation
from jaxinterp.attribution.base import AttributionError
from jaxinterp.tasks.metrics import metric_sum
from jaxinterp.circuits import convention
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward
from jaxinterp.tasks import Dataset

LEVELS = ("edge", "node", "neuron")


def _order(scores: np.ndarray, absolute: bool, score_convention: str) -> np.ndarray:
  """Flat indices of the scored (non-NaN) entries, best first, ties by index."""
  flat = np.asarray(scores, np.float64).ravel()
  idx = np.flatnonzero(~np.isnan(flat))
  key = np.abs(flat[idx]) if absolute else convention.importance_sign(score_convention) * flat[idx]
  return idx[np.lexsort((idx, -key))]


def _check_n(n: int, total: int, what: str) -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= total:
    raise AttributionError(f"top_n: n={n!r} must be an integer in [0, {total}] (scored {what})")
  return int(n)


def top_n_nodes(cfg, scores: np.ndarray, n: int, *, absolute: bool = True,
                score_convention: str = convention.METRIC, prune: bool = True) -> G.Graph:
  """The circuit of the n best nodes (Float [n_senders] scores; NaN = unscored, always kept)."""
  scores = np.asarray(scores, np.float32)
  g = G.Graph(cfg, meta={convention.KEY: score_convention})
  if scores.shape != (g.n_senders,):
    raise AttributionError(f"node scores must have shape ({g.n_senders},), got {scores.shape}")
  order = _order(scores, absolute, score_convention)
  n = _check_n(n, order.size, "nodes")
  nodes = np.isnan(scores)
  nodes[order[:n]] = True
  g = g.replace(node_attribution=scores)
  mask = g.valid & nodes[:, None] & np.append(nodes, True)[g.receiver_node][None, :]
  return g.with_edges(mask, prune=prune)


def top_n_neurons(cfg, scores: np.ndarray, n: int, *, absolute: bool = True,
                  score_convention: str = convention.METRIC, prune: bool = True) -> G.Graph:
  """The circuit of the n best neurons (Float [n_senders, d_model] scores; NaN = always kept)."""
  scores = np.asarray(scores, np.float32)
  g = G.Graph(cfg, meta={convention.KEY: score_convention})
  if scores.ndim != 2 or scores.shape[0] != g.n_senders:
    raise AttributionError(f"neuron scores must have shape ({g.n_senders}, d_model), got "
                           f"{scores.shape}")
  order = _order(scores, absolute, score_convention)
  n = _check_n(n, order.size, "neurons")
  keep = np.isnan(scores).ravel()
  keep[order[:n]] = True
  keep = keep.reshape(scores.shape)
  nodes = keep.any(1)
  mask = g.valid & nodes[:, None]
  g = g.replace(neuron_scores=scores, neurons_in_graph=keep).with_edges(mask, prune=prune)
  return g.replace(neurons_in_graph=keep & g.nodes_in_graph[:, None])


def top_n(cfg, scores: np.ndarray, n: int, level: str, *, absolute: bool = True,
          score_convention: str = convention.METRIC) -> G.Graph:
  """The pruned top-n circuit of a level's scores (edges: `Graph.top_n`)."""
  if level == "node":
    return top_n_nodes(cfg, scores, n, absolute=absolute, score_convention=score_convention)
  if level == "neuron":
    return top_n_neurons(cfg, scores, n, absolute=absolute, score_convention=score_convention)
  if level != "edge":
    raise AttributionError(f"level must be one of {LEVELS}, got {level!r}")
  return G.Graph.from_config(cfg, scores, score_convention).top_n(n, absolute=absolute)


def n_scored(scores: np.ndarray, level: str, cfg) -> int:
  """How many items a level's scores rank: valid edges, or non-NaN nodes / neurons."""
  if level == "edge":
    return G.Graph(cfg).n_edges
  return int(np.sum(~np.isnan(np.asarray(scores, np.float64))))


# ------------------------------------------------------------------------- neuron-circuit forward


@flax.struct.dataclass
class Mix:
  """x -> ablated + keep * (x - ablated): keep (0/1, or a weight) each output dimension live."""

  keep: jax.Array
  ablated: jax.Array

  def __call__(self, x):
    a = self.ablated.astype(x.dtype)
    return a + self.keep.astype(x.dtype) * (x - a)


def neuron_interventions(cfg: ModelConfig, keep: jax.Array, ablated: jax.Array) -> dict:
  """Site -> `Mix` for a neuron mask keep [n_senders, d_model] and ablated sender values
  [batch, pos, n_senders, d_model]."""
  iv = {"blocks.0.hook_resid_pre": Mix(keep[0], ablated[:, :, 0])}
  for l in range(cfg.n_layers):
    h0, m = E.head_sender(cfg, l, 0), E.mlp_sender(cfg, l)
    iv[f"blocks.{l}.attn.hook_result"] = Mix(keep[h0:m], ablated[:, :, h0:m])
    iv[f"blocks.{l}.hook_mlp_out"] = Mix(keep[m], ablated[:, :, m])
  return iv


@functools.partial(jax.jit, static_argnames=("cfg", "task"))
def _neuron_circuits_batch(cfg, task, params, batch, ablation, keeps):
  """Metric sums over the batch for each neuron mask: keeps [C, S, d] -> Float[Array, "C"]."""
  ablated = ablation.values(cfg, params, batch)
  clean_logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)

  def one(keep):
    logits = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                     interventions=neuron_interventions(cfg, keep, ablated))
    return metric_sum(task, logits, batch, clean_logits)[0]

  return jax.vmap(one)(keeps)


def evaluate_neuron_circuits(cfg: ModelConfig, params, dataset: Dataset, keeps: np.ndarray, *,
                             intervention: str = "patching", batch_size: int = 16, chunk: int = 8,
                             ablation: Optional[Ablation] = None, quiet: bool = False):
  """Mean metric over `dataset` for each neuron circuit.

  Args:
    keeps: Bool or Float [C, n_senders, d_model] (or one [n_senders, d_model]); 1 keeps an output
      dimension of a sender live in every receiver, 0 ablates it.

  Returns:
    float64 [C] (or a scalar for a single mask).
  """
  if cfg.post_norms:
    raise AttributionError("neuron circuits are not supported for post-norm models (Gemma-2): the "
                           "post-norm mixes a head's output dimensions")
  keeps = np.asarray(keeps, np.float32)
  single = keeps.ndim == 2
  keeps = keeps[None] if single else keeps
  if ablation is None:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  means = V.mean_over_batches(dataset, batch_size, keeps, chunk, quiet,
                              "evaluating neuron circuits",
                              lambda batch, k: _neuron_circuits_batch(cfg, dataset.task, params,
                                                                      batch, ablation, k))
  return float(means[0]) if single else means


@dataclasses.dataclass
class LevelCurve(V.FaithfulnessCurve):
  """A `FaithfulnessCurve` of node or neuron circuits: `n_edges` / `n_edges_kept` are the edges of
  each pruned circuit; `level` and `n_items` (nodes or neurons requested) say what was ranked."""

  level: str = "edge"
  n_items: Optional[np.ndarray] = None

  def rows(self) -> list[dict]:
    """One dict per circuit, with an `n_nodes` / `n_neurons` column beside the edge counts."""
    rows = super().rows()
    if self.n_items is not None:
      for r, k in zip(rows, self.n_items):
        r[f"n_{self.level}s"] = int(k)
    return rows


def faithfulness_curve(cfg: ModelConfig, params, dataset: Dataset, scores: np.ndarray,
                       level: str, *, counts: Optional[Sequence[int]] = None,
                       percentages: Optional[Sequence[float]] = None, absolute: bool = True,
                       score_convention: str = convention.METRIC,
                       intervention: str = "patching", batch_size: int = 16, chunk: int = 8,
                       ablation: Optional[Ablation] = None, quiet: bool = False):
  """Faithfulness of the level's top-n circuits, for n in `counts` (items of the level) or
  `percentages` of the scored items (default MIB's, as its `evaluate_area_under_curve`).

  Edges delegate to `evaluation.faithfulness_curve`. Returns a `LevelCurve` whose `percentages`
  are of the scored items.
  """
  if level == "edge":
    return V.faithfulness_curve(cfg, params, dataset, scores, n_edges=counts,
                                percentages=percentages, absolute=absolute,
                                intervention=intervention, batch_size=batch_size, chunk=chunk,
                                quiet=quiet, ablation=ablation)
  total = n_scored(scores, level, cfg)
  if counts is None:
    percentages = list(G.MIB_PERCENTAGES if percentages is None else percentages)
    counts = [G.n_edges_at_percentage(p, total) for p in percentages]
  else:
    counts = [int(n) for n in counts]
    percentages = [100.0 * n / max(total, 1) for n in counts]
  graphs = [top_n(cfg, scores, n, level, absolute=absolute, score_convention=score_convention)
            for n in counts]
  ablation = ablation or make_ablation(cfg, params, dataset, intervention, batch_size)
  m_full, m_empty = V.baselines(cfg, params, dataset, intervention=intervention,
                                batch_size=batch_size, ablation=ablation)
  if level == "node":
    metric = V.evaluate_circuits(cfg, params, dataset, np.stack([g.edge_weights() for g in graphs]),
                                 batch_size=batch_size, chunk=chunk, ablation=ablation, quiet=quiet)
  else:
    metric = evaluate_neuron_circuits(cfg, params, dataset,
                                      np.stack([g.neurons_in_graph for g in graphs]),
                                      batch_size=batch_size, chunk=chunk, ablation=ablation,
                                      quiet=quiet)
  metric = np.atleast_1d(metric)
  if m_full == m_empty:
    raise AttributionError("the full model and the empty circuit give the same metric; "
                           "faithfulness is undefined for this data and intervention")
  kept = np.asarray([g.count_edges() for g in graphs])
  return LevelCurve(kept, kept, np.asarray(percentages, np.float64), metric,
                    (metric - m_empty) / (m_full - m_empty), m_full, m_empty, level,
                    np.asarray(counts))
