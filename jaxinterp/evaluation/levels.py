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

Selection is `circuits.top_n(graph, n, level=...)` (`circuits.selection` states the rule of each
level); ranking is by |score| (`absolute=True`) or by signed importance (`circuits.convention`),
ties broken by index. Graphs carry the scores in `node_attribution` or `neuron_scores`, and
`circuits.io` writes them in `eap`'s JSON (nodes' `score`, or `neurons` and `neurons_scores`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import numpy as np

from jaxinterp import circuits as G
from jaxinterp.attribution.ablation import Ablation, make_ablation
from jaxinterp.attribution.base import LEVELS, AttributionError
from jaxinterp.circuits import convention
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward
from jaxinterp.tasks import Dataset
from jaxinterp.tasks.metrics import metric_sum


def top_n(cfg, scores: np.ndarray, n: int, level: str, *, absolute: bool = True,
          score_convention: str = convention.METRIC) -> G.Graph:
  """The pruned top-n circuit of a level's attribution scores: `circuits.top_n(graph, n,
  level=level)` on a graph holding them (edge scores Float [n_senders, n_receivers], node scores
  Float [n_senders] as `node_attribution`, neuron scores Float [n_senders, d_model] as
  `neuron_scores`; NaN = unscored, always kept). See `circuits.selection` for the rule of each
  level (the input node is ranked like any other node).
  """
  if level == "edge":
    return G.Graph.from_config(cfg, scores, score_convention).top_n(n, absolute=absolute)
  if level not in LEVELS:
    raise AttributionError(f"level must be one of {LEVELS}, got {level!r}")
  scores = np.asarray(scores, np.float32)
  g = G.Graph(cfg, meta={convention.KEY: score_convention})
  if level == "node" and scores.shape != (g.n_senders,):
    raise AttributionError(f"node scores must have shape ({g.n_senders},), got {scores.shape}")
  if level == "neuron" and (scores.ndim != 2 or scores.shape[0] != g.n_senders):
    raise AttributionError(f"neuron scores must have shape ({g.n_senders}, d_model), got "
                           f"{scores.shape}")
  total = int(np.sum(~np.isnan(scores)))
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= total:
    raise AttributionError(f"top_n: n={n!r} must be an integer in [0, {total}] (scored {level}s)")
  g = g.replace(**{"node_attribution" if level == "node" else "neuron_scores": scores})
  return g.top_n(n, absolute=absolute, level=level)


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
  for li in range(cfg.n_layers):
    h0, m = E.head_sender(cfg, li, 0), E.mlp_sender(cfg, li)
    iv[f"blocks.{li}.attn.hook_result"] = Mix(keep[h0:m], ablated[:, :, h0:m])
    iv[f"blocks.{li}.hook_mlp_out"] = Mix(keep[m], ablated[:, :, m])
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
                             ablation: Ablation | None = None, quiet: bool = False):
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
  n_items: np.ndarray | None = None

  def rows(self) -> list[dict]:
    """One dict per circuit, with an `n_nodes` / `n_neurons` column beside the edge counts."""
    rows = super().rows()
    if self.n_items is not None:
      for r, k in zip(rows, self.n_items, strict=True):
        r[f"n_{self.level}s"] = int(k)
    return rows


def faithfulness_curve(cfg: ModelConfig, params, dataset: Dataset, scores: np.ndarray,
                       level: str, *, counts: Sequence[int] | None = None,
                       percentages: Sequence[float] | None = None, absolute: bool = True,
                       score_convention: str = convention.METRIC,
                       intervention: str = "patching", batch_size: int = 16, chunk: int = 8,
                       ablation: Ablation | None = None, quiet: bool = False):
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
  counts, percentages = G.mib.sizes_and_percentages(total, counts=counts, percentages=percentages)
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
  kept = np.asarray([g.count_edges() for g in graphs])
  return LevelCurve(kept, kept, np.asarray(percentages, np.float64), metric,
                    V.normalize(metric, m_full, m_empty), m_full, m_empty, level,
                    np.asarray(counts))
