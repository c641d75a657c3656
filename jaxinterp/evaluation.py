"""Circuit evaluation: the metric under a circuit, baselines, faithfulness curves, CPR/CMD.

A circuit is an edge mask; edges outside it are ablated (their receivers read the ablated value of
the sender). Many circuits are evaluated in one compiled call by `vmap` over their weight matrices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp import circuits as G
from jaxinterp.attribution.ablation import Ablation, make_ablation
from jaxinterp.attribution.base import AttributionError, check_finite, metric_sum
from jaxinterp.tasks import Dataset
from models.config import ModelConfig
from models.edges import EdgePatch
from models.transformer import forward


@functools.partial(jax.jit, static_argnames=("cfg", "task"))
def _circuits_batch(cfg, task, params, batch, ablation, weights):
  """Metric sums over the batch for each circuit: weights [C, S, R] -> Float[Array, "C"]."""
  ablated = ablation.values(cfg, params, batch)
  clean_logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)

  def one(w):
    logits = forward(cfg, params, batch.clean, attention_mask=batch.mask, edges=EdgePatch(w, ablated))
    return metric_sum(task, logits, batch, clean_logits)[0]

  return jax.vmap(one)(weights)


def evaluate_circuits(cfg: ModelConfig, params, dataset: Dataset, weights: np.ndarray, *,
                      intervention: str = "patching", batch_size: int = 16, chunk: int = 8,
                      ablation: Optional[Ablation] = None, quiet: bool = False) -> np.ndarray:
  """Mean metric over `dataset` for each circuit.

  Args:
    weights: Float [C, n_senders, n_receivers] (or a single [S, R]); 1 = edge in the circuit.
    intervention: how edges outside the circuit are ablated (see `attribution.INTERVENTIONS`).
    chunk: circuits per compiled call (`vmap`).

  Returns:
    float64 [C] (or a scalar for a single circuit): mean over examples of the metric.
  """
  weights = np.asarray(weights, np.float32)
  single = weights.ndim == 2
  if single:
    weights = weights[None]
  if ablation is None:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  C = weights.shape[0]
  chunk = max(1, min(chunk, C))
  pad = (-C) % chunk
  if pad:
    weights = np.concatenate([weights, np.repeat(weights[-1:], pad, 0)])
  totals = np.zeros(weights.shape[0], np.float64)
  n_batches = math.ceil(len(dataset) / batch_size)
  bar = tqdm(total=n_batches * (weights.shape[0] // chunk), desc="evaluating circuits",
             disable=quiet or n_batches * weights.shape[0] // chunk < 4, leave=False)
  for i, batch in enumerate(dataset.batches(batch_size)):
    for start in range(0, weights.shape[0], chunk):
      out = np.asarray(_circuits_batch(cfg, dataset.task, params, batch, ablation,
                                       jnp.asarray(weights[start:start + chunk])), np.float64)
      check_finite(out, i, "the circuit metric")
      totals[start:start + chunk] += out
      bar.update(1)
  bar.close()
  means = totals[:C] / len(dataset)
  return float(means[0]) if single else means


def baselines(cfg: ModelConfig, params, dataset: Dataset, *, intervention: str = "patching",
              batch_size: int = 16, ablation: Optional[Ablation] = None) -> tuple[float, float]:
  """(m(full model), m(empty circuit)): the clean model, and every edge ablated."""
  g = G.Graph.from_config(cfg)
  full, empty = g.full().edge_weights(), g.empty().edge_weights()
  out = evaluate_circuits(cfg, params, dataset, np.stack([full, empty]), intervention=intervention,
                          batch_size=batch_size, ablation=ablation, quiet=True)
  return float(out[0]), float(out[1])


@dataclasses.dataclass
class FaithfulnessCurve:
  """Faithfulness of top-n circuits.

  Attributes:
    n_edges: requested circuit sizes (edges before pruning); n_edges_kept: edges after pruning.
    percentages: sizes in percent of all edges.
    metric: mean metric of each circuit; faithfulness: (m(C) - m(empty)) / (m(full) - m(empty)).
    m_full, m_empty: the baselines.
  """

  n_edges: np.ndarray
  n_edges_kept: np.ndarray
  percentages: np.ndarray
  metric: np.ndarray
  faithfulness: np.ndarray
  m_full: float
  m_empty: float

  def rows(self) -> list[dict]:
    return [dict(n_edges=int(n), n_edges_kept=int(k), percentage=float(p), metric=float(m),
                 faithfulness=float(f))
            for n, k, p, m, f in zip(self.n_edges, self.n_edges_kept, self.percentages, self.metric,
                                     self.faithfulness)]


def faithfulness_curve(cfg: ModelConfig, params, dataset: Dataset, scores: np.ndarray, *,
                       n_edges: Optional[Sequence[int]] = None,
                       percentages: Optional[Sequence[float]] = None, absolute: bool = True,
                       intervention: str = "patching", batch_size: int = 16, chunk: int = 8,
                       quiet: bool = False) -> FaithfulnessCurve:
  """Evaluate top-n circuits (pruned) for several n, in vmapped chunks.

  Give circuit sizes either as edge counts (`n_edges`) or as percentages of all edges (default:
  `graph.MIB_PERCENTAGES`). `absolute=False` ranks by signed score (MIB's CPR), True by |score|
  (CMD and the usual EAP-IG circuits).
  """
  g = G.Graph.from_config(cfg, scores)
  if n_edges is None:
    percentages = list(G.MIB_PERCENTAGES if percentages is None else percentages)
    n_edges = [G.n_edges_at_percentage(p, g.n_edges) for p in percentages]
  else:
    n_edges = [int(n) for n in n_edges]
    percentages = [100.0 * n / g.n_edges for n in n_edges]
  circuits = [g.top_n(n, absolute=absolute) for n in n_edges]
  weights = np.stack([c.edge_weights() for c in circuits])
  ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  m_full, m_empty = baselines(cfg, params, dataset, intervention=intervention,
                              batch_size=batch_size, ablation=ablation)
  metric = np.atleast_1d(evaluate_circuits(cfg, params, dataset, weights, batch_size=batch_size,
                                           chunk=chunk, ablation=ablation, quiet=quiet))
  if m_full == m_empty:
    raise AttributionError("the full model and the empty circuit give the same metric; "
                           "faithfulness is undefined for this data and intervention")
  faith = (metric - m_empty) / (m_full - m_empty)
  return FaithfulnessCurve(np.asarray(n_edges), np.asarray([c.count_edges() for c in circuits]),
                           np.asarray(percentages, np.float64), metric, faith, m_full, m_empty)


def mib_scores(cfg: ModelConfig, params, dataset: Dataset, scores: np.ndarray, *,
               intervention: str = "patching", batch_size: int = 16) -> dict[str, float]:
  """MIB's CPR (area under f, signed ranking) and CMD (area under |1 - f|, absolute ranking)."""
  pcts = list(G.MIB_PERCENTAGES)
  signed = faithfulness_curve(cfg, params, dataset, scores, percentages=pcts, absolute=False,
                              intervention=intervention, batch_size=batch_size, quiet=True)
  absolute = faithfulness_curve(cfg, params, dataset, scores, percentages=pcts, absolute=True,
                                intervention=intervention, batch_size=batch_size, quiet=True)
  return {"CPR": G.cpr(pcts, signed.faithfulness), "CMD": G.cmd(pcts, absolute.faithfulness)}
