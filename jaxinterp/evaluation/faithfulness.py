"""Circuit evaluation: the metric under a circuit, baselines, faithfulness curves, CPR/CMD.

A circuit is an edge mask; edges outside it are ablated (their receivers read the ablated value of
the sender). Circuits run through `circuit_forward`, which computes only the nodes a circuit reads;
`reference=True` runs the graph-form forward instead (every node, `vmap` over chunks of circuits),
which the tests hold the fast path to.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp import circuits as G
from jaxinterp.attribution.ablation import Ablation, make_ablation
from jaxinterp.attribution.base import AttributionError, check_finite
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import forward
from jaxinterp.runtime import distributed, timing
from jaxinterp.tasks import Dataset
from jaxinterp.tasks.metrics import metric_sum


@functools.partial(jax.jit, static_argnames=("cfg", "task"))
def _circuits_batch(cfg, task, params, batch, ablation, weights):
  """Metric sums over the batch for each circuit: weights [C, S, R] -> Float[Array, "C"]."""
  ablated = ablation.values(cfg, params, batch)
  clean_logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)

  def one(w):
    logits = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                     edges=EdgePatch(w, ablated))
    return metric_sum(task, logits, batch, clean_logits)[0]

  return jax.vmap(one)(weights)


def evaluate_circuits(cfg: ModelConfig, params, dataset: Dataset, weights: np.ndarray, *,
                      intervention: str = "patching", batch_size: int = 16, chunk: int = 8,
                      ablation: Ablation | None = None, quiet: bool = False,
                      reference: bool = False) -> np.ndarray:
  """Mean metric over `dataset` for each circuit.

  Args:
    weights: Float [C, n_senders, n_receivers] (or a single [S, R]); 1 = edge in the circuit.
    intervention: how edges outside the circuit are ablated (see `attribution.INTERVENTIONS`).
    chunk: circuits per compiled call of the reference path (`vmap`).
    reference: run the graph-form forward (every node, every head's own input) instead of
      `circuit_forward`; slower, the definition the fast path is tested against.

  Returns:
    float64 [C] (or a scalar for a single circuit): mean over examples of the metric.
  """
  weights = np.asarray(weights, np.float32)
  single = weights.ndim == 2
  if single:
    weights = weights[None]
  if ablation is None:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  if reference or not CF.supported(cfg):
    means = mean_over_batches(dataset, batch_size, weights, chunk, quiet, "evaluating circuits",
                              lambda batch, w: _circuits_batch(cfg, dataset.task, params, batch,
                                                               ablation, w))
  else:
    means = _circuit_forward_means(cfg, params, dataset, weights, batch_size, ablation, quiet)
  return float(means[0]) if single else means


def _circuit_forward_means(cfg: ModelConfig, params, dataset: Dataset, weights: np.ndarray,
                           batch_size: int, ablation: Ablation, quiet: bool) -> np.ndarray:
  """`evaluate_circuits` through `circuit_forward`: each batch prepared once, then every circuit
  (one chunk of all of them, so the preparation is not repeated)."""
  fwd = CF.CircuitForward(cfg, params, dataset.task, valid_edges(cfg))

  def batch_fn(batch, ws):
    prep = fwd.prepare(batch, ablation)
    return jnp.stack([fwd.metric(batch, prep, w) for w in ws])

  return mean_over_batches(dataset, batch_size, weights, len(weights), quiet,
                           "evaluating circuits", batch_fn)


def compile_ahead(cfg: ModelConfig, params, dataset: Dataset, *, intervention: str = "patching",
                  batch_size: int = 16) -> threading.Thread | None:
  """Start compiling what `evaluate_circuits` will run on `dataset`, in a daemon thread, and return
  it (join it before evaluating); None where there is nothing to do ahead: the reference path, or an
  ablation whose values need a pass over the data.

  `find_circuit` runs it alongside attribution. The thread's compiles are off the caller's critical
  path, so `timing`'s timers do not count them; a failure is logged, and the evaluation then
  compiles for itself.
  """
  if not CF.supported(cfg) or intervention not in ("patching", "zero", "zero-all"):
    return None

  def work():
    with timing.in_background():
      try:
        ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
        CF.CircuitForward(cfg, params, dataset.task, valid_edges(cfg)).compile(
            dataset.batches(batch_size), ablation)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("compiling the circuit forward ahead failed: %s", e)

  thread = threading.Thread(target=work, name="compile-ahead", daemon=True)
  thread.start()
  return thread


def mean_over_batches(dataset: Dataset, batch_size: int, masks: np.ndarray, chunk: int,
                      quiet: bool, desc: str, batch_fn) -> np.ndarray:
  """Mean over `dataset` of `batch_fn(batch, masks[chunk])` (metric sums over a batch, one per
  mask; the masks a numpy slice), for every mask: `chunk` masks per call, the last chunk padded.
  Returns float64 [len(masks)]; a NaN/inf metric names its batch.

  In a multi-process run (`runtime.distributed`) process p runs batches p, p + N, ... and the
  per-batch float64 sums are added in batch order on every process (`distributed.sum_split`): every
  process returns what one process would, bitwise. A collective: every process calls it."""
  C = masks.shape[0]
  chunk = max(1, min(chunk, C))
  masks = np.concatenate([masks, np.repeat(masks[-1:], (-C) % chunk, 0)])
  n_batches = math.ceil(len(dataset) / batch_size)
  steps = distributed.n_owned(n_batches) * (masks.shape[0] // chunk)
  bar = tqdm(total=steps, desc=desc, disable=quiet or steps < 4 or not distributed.is_writer(),
             leave=False)

  def one(i, batch):
    sums = np.zeros(masks.shape[0], np.float64)
    for start in range(0, masks.shape[0], chunk):
      out = np.asarray(batch_fn(batch, masks[start:start + chunk]), np.float64)
      check_finite(out, i, "the circuit metric")
      sums[start:start + chunk] = out
      bar.update(1)
    return sums

  totals = distributed.sum_split(dataset.batches(batch_size), one,
                                 np.zeros(masks.shape[0], np.float64))
  bar.close()
  return totals[:C] / len(dataset)


def baselines(cfg: ModelConfig, params, dataset: Dataset, *, intervention: str = "patching",
              batch_size: int = 16, ablation: Ablation | None = None) -> tuple[float, float]:
  """(m(full model), m(empty circuit)): the clean model, and every edge ablated."""
  g = G.Graph.from_config(cfg)
  full, empty = g.full().edge_weights(), g.empty().edge_weights()
  out = evaluate_circuits(cfg, params, dataset, np.stack([full, empty]), intervention=intervention,
                          batch_size=batch_size, ablation=ablation, quiet=True)
  return float(out[0]), float(out[1])


CURVE_KINDS = ("counts", "mib")
"""How a faithfulness curve's circuit sizes are chosen (`curve_sizes`)."""

COUNT_SIZES: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000,
                                20000, 50000, 100000)
"""The sizes of a "counts" curve (plus the total), in items of the level (edges, nodes, neurons)."""


def curve_sizes(kind: str, n_total: int, extra: Iterable[int] = ()) -> list[int]:
  """The circuit sizes of a faithfulness curve over `n_total` ranked items, sorted and unique.

  `kind="counts"`: `COUNT_SIZES` and `n_total` itself; `kind="mib"`: MIB's percentages of
  `n_total` (`circuits.MIB_PERCENTAGES`, `circuits.n_edges_at_percentage`). `extra` sizes (e.g. the
  selected circuit's) are added; sizes above `n_total` are dropped.
  """
  if kind == "mib":
    sizes = G.mib.sizes_and_percentages(n_total)[0]
  elif kind == "counts":
    sizes = [*COUNT_SIZES, n_total]
  else:
    raise AttributionError(f"curve sizes must be one of {CURVE_KINDS}, got {kind!r}")
  return sorted({int(n) for n in [*sizes, *extra] if n <= n_total})


def normalize(metric, m_full: float, m_empty: float):
  """Faithfulness `(m(C) - m(empty)) / (m(full) - m(empty))` of circuit metrics (a float, or an
  array of the metric's shape), by `circuits.normalized_faithfulness`.

  Raises AttributionError when the full model and the empty circuit give the same metric (the
  faithfulness is then undefined).
  """
  if m_full == m_empty:
    raise AttributionError("the full model and the empty circuit give the same metric; "
                           "faithfulness is undefined for this data and intervention")
  return G.normalized_faithfulness(metric, m_full, m_empty)


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
    """One dict per circuit size (`faithfulness.csv`'s rows); floats `+ 0.0`, so never `-0.0`."""
    return [dict(n_edges=int(n), n_edges_kept=int(k), percentage=float(p) + 0.0,
                 metric=float(m) + 0.0, faithfulness=float(f) + 0.0)
            for n, k, p, m, f in zip(self.n_edges, self.n_edges_kept, self.percentages, self.metric,
                                     self.faithfulness, strict=True)]


def _curve_circuits(cfg: ModelConfig, dataset: Dataset, scores: np.ndarray,
                    n_edges: Sequence[int] | None, percentages: Sequence[float] | None,
                    absolute: bool, score_convention: str | None):
  """(n_edges, percentages, pruned top-n circuits) of a faithfulness curve."""
  g = G.Graph.from_config(cfg, scores, score_convention=score_convention or
                          G.convention.for_task(dataset.task))
  n_edges, percentages = G.mib.sizes_and_percentages(g.n_edges, counts=n_edges,
                                                     percentages=percentages)
  return n_edges, percentages, [g.top_n(n, absolute=absolute) for n in n_edges]


def _with_baselines(cfg: ModelConfig, params, dataset: Dataset, weights: np.ndarray, *,
                    intervention: str, batch_size: int, chunk: int, ablation: Ablation | None,
                    quiet: bool) -> tuple[float, float, np.ndarray, np.ndarray]:
  """(m(full), m(empty), metric and faithfulness of each circuit), all from one `evaluate_circuits`
  call (so each batch's clean and ablated runs are shared by the baselines and the circuits)."""
  g = G.Graph.from_config(cfg)
  both = np.concatenate([np.stack([g.full().edge_weights(), g.empty().edge_weights()]), weights])
  ablation = ablation or make_ablation(cfg, params, dataset, intervention, batch_size)
  metric = np.atleast_1d(evaluate_circuits(cfg, params, dataset, both, batch_size=batch_size,
                                           chunk=chunk, ablation=ablation, quiet=quiet))
  m_full, m_empty = float(metric[0]), float(metric[1])
  metric = metric[2:]
  return m_full, m_empty, metric, normalize(metric, m_full, m_empty)


def faithfulness_curve(cfg: ModelConfig, params, dataset: Dataset, scores: np.ndarray, *,
                       n_edges: Sequence[int] | None = None,
                       percentages: Sequence[float] | None = None, absolute: bool = True,
                       intervention: str = "patching", batch_size: int = 16, chunk: int = 8,
                       quiet: bool = False,
                       ablation: Ablation | None = None,
                       score_convention: str | None = None) -> FaithfulnessCurve:
  """Evaluate top-n circuits (pruned) for several n, and the two baselines, in one pass.

  Give circuit sizes either as edge counts (`n_edges`) or as percentages of all edges (default:
  `graph.MIB_PERCENTAGES`). `scores` are in `score_convention` (default: that of
  `attribution.attribute`'s scores for `dataset.task`'s metric, `circuits.convention.for_task`).
  `absolute=False` ranks by signed importance (MIB's CPR; `circuits.convention`), True by |score|
  (CMD and the usual EAP-IG circuits). `ablation` (e.g. learned optimal-ablation values, built once
  with `make_ablation`) replaces the one `intervention` would build.
  """
  n_edges, percentages, circuits = _curve_circuits(cfg, dataset, scores, n_edges, percentages,
                                                   absolute, score_convention)
  weights = np.stack([c.edge_weights() for c in circuits])
  m_full, m_empty, metric, faith = _with_baselines(cfg, params, dataset, weights,
                                                   intervention=intervention,
                                                   batch_size=batch_size, chunk=chunk,
                                                   ablation=ablation, quiet=quiet)
  return FaithfulnessCurve(np.asarray(n_edges), np.asarray([c.count_edges() for c in circuits]),
                           np.asarray(percentages, np.float64), metric, faith, m_full, m_empty)


def mib_scores(cfg: ModelConfig, params, dataset: Dataset, scores: np.ndarray, *,
               intervention: str = "patching", batch_size: int = 16,
               score_convention: str | None = None,
               ablation: Ablation | None = None) -> dict[str, float]:
  """MIB's CPR (area under f, signed ranking) and CMD (area under |1 - f|, absolute ranking).

  `scores` are in `score_convention` (default: attribution scores of `dataset.task`'s metric; pass
  "loss" for the scores of a graph file, `Graph.from_json(...).scores`). Both rankings' circuits
  are evaluated in one pass. `ablation` (built once by the caller, e.g. learned optimal-ablation
  constants) replaces the one `intervention` would build.
  """
  pcts = list(G.MIB_PERCENTAGES)
  _, _, signed = _curve_circuits(cfg, dataset, scores, None, pcts, False, score_convention)
  _, _, absolute = _curve_circuits(cfg, dataset, scores, None, pcts, True, score_convention)
  weights = np.stack([c.edge_weights() for c in signed + absolute])
  _, _, _, faith = _with_baselines(cfg, params, dataset, weights, intervention=intervention,
                                   batch_size=batch_size, chunk=8, ablation=ablation, quiet=True)
  return {"CPR": G.cpr(pcts, faith[:len(pcts)]), "CMD": G.cmd(pcts, faith[len(pcts):])}


def mib_protocol(cfg: ModelConfig, params, dataset: Dataset, graph: G.Graph, *,
                 level: str = "edge", absolute: bool = False, log_scale: bool = False,
                 intervention: str = "patching", batch_size: int = 16,
                 ablation: Ablation | None = None) -> dict:
  """MIB's `evaluate_area_under_curve` on a scored graph: circuits of `circuits.MIB_FRACTIONS` of
  the scored items (edges, or scored nodes with `level="node"`), each pruned; faithfulness
  `(m(C) - m(empty)) / (m(full) - m(empty))`; CPR (`area_under`) and CMD (`area_from_1`) by the
  trapezoid rule over the fractions (their logs with `log_scale`). `absolute=False` (MIB's default)
  ranks by signed importance. All circuits are evaluated in one `evaluate_circuits` call.

  Returns:
    `circuits.mib_summary`'s dict (weighted_edge_counts, area_under, area_from_1, average,
    faithfulnesses, fractions) plus n_items, metric_full and metric_empty.
  """
  chosen = G.mib_circuits(graph, level=level, absolute=absolute)
  weights = np.stack([c.edge_weights() for _, c, _ in chosen])
  m_full, m_empty, _, faith = _with_baselines(cfg, params, dataset, weights,
                                              intervention=intervention, batch_size=batch_size,
                                              chunk=8, ablation=ablation, quiet=True)
  out = G.mib_summary(faith, [w for _, _, w in chosen], log_scale=log_scale)
  out.update(n_items=[n for n, _, _ in chosen], metric_full=m_full, metric_empty=m_empty,
             level=level, absolute=absolute)
  return out
