"""Circuit evaluation arithmetic (MIB conventions), as pure numpy.

Normalised faithfulness, CPR and CMD areas over `MIB_PERCENTAGES`, circuit sizes in percent of the
model's edges, and node/edge IoU between circuits. No model code:
`jaxinterp.evaluation.faithfulness` runs the model and uses these to summarise the results.

All bad input raises `GraphError` (a `ValueError`) with a message that names what is wrong.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from jaxinterp.circuits import io, layout, selection
from jaxinterp.circuits.layout import GraphError
from jaxinterp.runtime.files import atomic_write

if TYPE_CHECKING:
  from jaxinterp.circuits.graph import Graph

MIB_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
"""Circuit sizes of MIB's circuit-localisation track, in percent of the model's valid edges."""

def normalized_faithfulness(m_circuit, m_full, m_empty):
  """(m(C) - m(empty)) / (m(full) - m(empty)); 1 for the full model, 0 for the empty circuit.

  Pass the task metric averaged over examples (MIB normalises the means). Scalars give a float;
  arrays broadcast. GraphError if full and empty metrics coincide (faithfulness undefined) or any
  input is not finite.
  """
  c, f, e = (np.asarray(x, np.float64) for x in (m_circuit, m_full, m_empty))
  for name, x in (("m_circuit", c), ("m_full", f), ("m_empty", e)):
    if not np.isfinite(x).all():
      raise GraphError(f"normalized_faithfulness: {name} is not finite: {x}")
  denom = f - e
  if (denom == 0).any():
    raise GraphError("normalized_faithfulness: the full and empty circuits have the same metric, "
                     "so faithfulness is undefined")
  out = (c - e) / denom
  return float(out) if out.ndim == 0 else out


def _curve(percentages: Sequence[float],
           faithfulness: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  try:
    p = np.asarray(percentages, np.float64)
    f = np.asarray(faithfulness, np.float64)
  except (TypeError, ValueError) as e:
    raise GraphError(f"percentages and faithfulness must be sequences of numbers: {e}") from e
  if p.ndim != 1 or f.shape != p.shape or p.size < 2:
    raise GraphError(f"need two 1-D sequences of equal length >= 2, got shapes {p.shape}, "
                     f"{f.shape}")
  if not (np.isfinite(p).all() and np.isfinite(f).all()):
    raise GraphError("percentages and faithfulness must be finite")
  if (p <= 0).any() or (p > 100).any() or (np.diff(p) <= 0).any():
    raise GraphError(f"percentages must increase strictly within (0, 100], got {p.tolist()}")
  return p / 100.0, f


def cpr(percentages: Sequence[float], faithfulness: Sequence[float],
        log_scale: bool = False) -> float:
  """MIB's CPR: trapezoidal area under the faithfulness curve (higher is better).

  `percentages` are circuit sizes in percent of the model's edges (e.g. `MIB_PERCENTAGES`); the x
  axis is their fraction (percent / 100), on a linear scale as in MIB's `evaluate_area_under_curve`
  (or its log with `log_scale`), so the area spans [x_first, x_last] and a constant curve f = 1 over
  `MIB_PERCENTAGES` gives 0.999. MIB computes CPR on circuits ranked by signed scores.
  """
  x, f = _curve(percentages, faithfulness)
  return area_under(x, f, log_scale)


def cmd(percentages: Sequence[float], faithfulness: Sequence[float],
        log_scale: bool = False) -> float:
  """MIB's CMD: trapezoidal area under |1 - faithfulness| (lower is better); x axis as in `cpr`.

  MIB computes CMD on circuits ranked by absolute scores.
  """
  x, f = _curve(percentages, faithfulness)
  return area_from_1(x, f, log_scale)


def n_edges_at_percentage(percentage: float, n_total: int) -> int:
  """Edges in a circuit of `percentage`% of `n_total` edges: floor(percentage / 100 * n_total).

  MIB uses `int(fraction * n_edges)`; this computes the same floor exactly (decimal percentages are
  read as the decimal they denote), so 0.1% of GPT-2's 32,491 edges is 32.
  """
  if isinstance(percentage, bool) or not isinstance(percentage, numbers.Real) or \
     not math.isfinite(percentage) or not 0 <= percentage <= 100:
    raise GraphError(f"percentage must be in [0, 100], got {percentage!r}")
  n_total = layout.check_count(n_total, 1 << 62, "n_total")
  frac = Fraction(percentage).limit_denominator(10**9) / 100
  return math.floor(frac * n_total)


def sizes_and_percentages(n_total: int, *, counts: Sequence[int] | None = None,
                          percentages: Sequence[float] | None = None
                          ) -> tuple[list[int], list[float]]:
  """A curve's circuit sizes both ways, (counts, percentages of `n_total`), from either.

  With `counts`, percentages are `100 * n / n_total`; otherwise `percentages` (default
  `MIB_PERCENTAGES`) give the counts `n_edges_at_percentage(p, n_total)`.
  """
  if counts is not None:
    counts = [int(n) for n in counts]
    return counts, [100.0 * n / max(n_total, 1) for n in counts]
  percentages = list(MIB_PERCENTAGES if percentages is None else percentages)
  return [n_edges_at_percentage(p, n_total) for p in percentages], percentages


def _same_layout(g1: Graph, g2: Graph) -> None:
  k1, k2 = g1.layout, g2.layout
  if (k1.n_layers, k1.n_heads, k1.parallel) != (k2.n_layers, k2.n_heads, k2.parallel):
    raise GraphError(f"graphs have different shapes: ({k1.describe()}) vs ({k2.describe()})")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = int(np.logical_or(a, b).sum())
  if union == 0:
    return 1.0  # two empty circuits are identical
  return int(np.logical_and(a, b).sum()) / union


def edge_iou(g1: Graph, g2: Graph) -> float:
  """Intersection over union of the two circuits' edge sets (1.0 if both are empty)."""
  _same_layout(g1, g2)
  return _iou(g1.in_graph, g2.in_graph)


def node_iou(g1: Graph, g2: Graph) -> float:
  """Intersection over union of the two circuits' node sets (input, heads, MLPs).

  `logits` is left out: it is in every circuit and would only inflate the overlap. 1.0 if both sets
  are empty.
  """
  _same_layout(g1, g2)
  return _iou(g1.nodes_in_graph, g2.nodes_in_graph)


# --------------------------------------------------------------------------------------------------
# MIB's evaluation protocol (`MIB_circuit_track/evaluation.py: evaluate_area_under_curve`)
# --------------------------------------------------------------------------------------------------

MIB_FRACTIONS: tuple[float, ...] = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)
"""The fractions of scored items (edges, or scored nodes) MIB evaluates circuits at."""

SUBMISSION_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)
"""Edge percentages of the nine binary circuits of an MIB leaderboard submission."""


def _areas(fractions: Sequence[float], faithfulness: Sequence[float], log_scale: bool):
  x = [float(v) for v in fractions]
  f = [float(v) for v in faithfulness]
  if len(x) != len(f) or len(x) < 2:
    raise GraphError(f"need two sequences of equal length >= 2, got {len(x)} and {len(f)}")
  if not all(math.isfinite(v) for v in x + f) or (log_scale and min(x) <= 0):
    raise GraphError("fractions and faithfulness must be finite (and fractions > 0 with log_scale)")
  under = from_1 = 0.0
  for i in range(len(f) - 1):  # MIB's loop: the trapezoid rule, summed in order
    x1, x2 = (math.log(x[i]), math.log(x[i + 1])) if log_scale else (x[i], x[i + 1])
    from_1 += (x2 - x1) * ((abs(1.0 - f[i]) + abs(1.0 - f[i + 1])) / 2)
    under += (x2 - x1) * ((f[i] + f[i + 1]) / 2)
  return under, from_1


def area_under(fractions: Sequence[float], faithfulness: Sequence[float],
               log_scale: bool = False) -> float:
  """MIB's `area_under` (CPR): the trapezoidal area under faithfulness over the fractions of
  items (x = log(fraction) with `log_scale`), exactly as MIB sums it."""
  return _areas(fractions, faithfulness, log_scale)[0]


def area_from_1(fractions: Sequence[float], faithfulness: Sequence[float],
                log_scale: bool = False) -> float:
  """MIB's `area_from_1` (CMD): the trapezoidal area under |1 - faithfulness|, as `area_under`."""
  return _areas(fractions, faithfulness, log_scale)[1]


def _eap_node_circuit(graph: Graph, n: int, absolute: bool) -> tuple[np.ndarray, int]:
  """EAP-IG's `apply_topn(n, level='node', prune=True)`: (the circuit's real edges, MIB's weighted
  edge count). As there, every edge out of a kept node starts in the graph (real or not: the count
  includes edges a receiver cannot read), and pruning looks at all of them."""
  L = graph.layout
  nodes = np.isnan(graph.node_attribution)
  nodes[selection.ranked(graph.node_attribution, absolute=absolute,
                         score_convention=graph.score_convention)[:n]] = True
  edges = np.repeat(nodes[:, None], L.n_receivers, axis=1)
  while True:
    incoming = np.zeros(L.n_senders + 1, bool)
    np.logical_or.at(incoming, L.receiver_node, edges.any(axis=0))
    nodes = edges.any(axis=1) & np.concatenate([[True], incoming[1:L.n_senders]])
    new = edges & nodes[:, None] & np.append(nodes, True)[L.receiver_node][None, :]
    if np.array_equal(new, edges):
      break
    edges = new
  return edges & L.valid, int(edges.sum())


def mib_circuits(graph: Graph, *, level: str = "edge", absolute: bool = False,
                 fractions: Sequence[float] = MIB_FRACTIONS) -> list[tuple[int, Graph, float]]:
  """The circuits MIB evaluates: for each fraction, (items kept, circuit, weighted edge count).

  `level="edge"`: the top `int(fraction * n_edges)` edges, pruned (EAP-IG's `apply_topn`);
  `level="node"`: the top `int(fraction * n_scored_nodes)` nodes by `graph.node_attribution` (NaN =
  unscored, always kept), as EAP-IG's node-level `apply_topn` selects and prunes them. `absolute`
  ranks by |score|, else by signed importance (MIB's default, `--absolute` unset).
  """
  if level == "node":
    if graph.node_attribution is None:
      raise GraphError("node-level MIB evaluation needs node scores (node_attribution)")
    n_items = int((~np.isnan(graph.node_attribution)).sum())
  elif level == "edge":
    n_items = graph.n_edges
  else:
    raise GraphError(f"level must be 'edge' or 'node' (neuron circuits are not supported), got "
                     f"{level!r}")
  out = []
  for frac in fractions:
    n = int(frac * n_items)  # MIB's rounding, in floating point
    if level == "edge":
      c = graph.top_n(n, absolute=absolute, prune=True)
      out.append((n, c, float(c.count_edges())))
    else:
      mask, weighted = _eap_node_circuit(graph, n, absolute)
      out.append((n, graph.with_edges(mask, prune=False), float(weighted)))
  return out


def mib_summary(faithfulness: Sequence[float], weighted_edge_counts: Sequence[float], *,
                fractions: Sequence[float] = MIB_FRACTIONS, log_scale: bool = False) -> dict:
  """MIB's result dict: weighted_edge_counts, area_under (CPR), area_from_1 (CMD), average,
  faithfulnesses (plus the fractions)."""
  f = [float(v) for v in faithfulness]
  return {"fractions": list(map(float, fractions)), "weighted_edge_counts": list(
      map(float, weighted_edge_counts)), "area_under": area_under(fractions, f, log_scale),
          "area_from_1": area_from_1(fractions, f, log_scale), "average": sum(f) / len(f),
          "faithfulnesses": f, "log_scale": log_scale}


# --------------------------------------------------------------------------------------------------
# MIB leaderboard submissions
# --------------------------------------------------------------------------------------------------


def _binary(d: dict) -> dict:
  """A graph JSON without scores: MIB's binary-circuit format."""
  return {"cfg": d["cfg"], "nodes": {k: {"in_graph": v["in_graph"]} for k, v in d["nodes"].items()},
          "edges": {k: {"in_graph": v["in_graph"]} for k, v in d["edges"].items()}}


def write_submission(graph: Graph, out_dir: str | os.PathLike, task: str, model: str, *,
                     kind: str = "importances", absolute: bool = True) -> str:
  """Write one run in the layout of MIB's leaderboard: `out_dir/{task}_{model}/` holding either
  `importances.json` (every edge's score, MIB's `circuits/*.json` format, EAP-IG's sign) or, with
  `kind="circuits"`, nine binary circuits `circuit_{p}.json` of at most p% of the edges (p in
  `SUBMISSION_PERCENTAGES`; the top `floor(p% of edges)` by |score|, or by signed importance unless
  `absolute`, then pruned). Files of the other kind in the folder are removed. Returns the folder.
  """
  if kind not in ("importances", "circuits"):
    raise GraphError(f"kind must be 'importances' or 'circuits', got {kind!r}")
  for name, value in (("task", task), ("model", model)):
    if not value or os.sep in value or value in (".", ".."):
      raise GraphError(f"MIB submission: {name} must be a plain name, got {value!r}")
  folder = os.path.join(os.fspath(out_dir), f"{task.replace('_', '-')}_{model}")
  try:
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
      if f == "importances.json" or (f.startswith("circuit_") and f.endswith(".json")):
        os.remove(os.path.join(folder, f))
  except OSError as e:
    raise GraphError(f"cannot write the MIB submission folder {folder}: {e}") from e
  try:
    if kind == "importances":
      d = io.to_dict(graph)
      d.pop("meta", None)
      atomic_write(os.path.join(folder, "importances.json"), json.dumps(d).encode())
      return folder
    for p in SUBMISSION_PERCENTAGES:
      c = graph.top_n(n_edges_at_percentage(p, graph.n_edges), absolute=absolute, prune=True)
      atomic_write(os.path.join(folder, f"circuit_{p:g}.json"),
                   json.dumps(_binary(io.to_dict(c))).encode())
  except OSError as e:
    raise GraphError(f"cannot write the MIB submission in {folder}: {e}") from e
  return folder
