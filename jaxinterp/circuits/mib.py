"""Circuit evaluation arithmetic (MIB conventions), as pure numpy.

Normalised faithfulness, CPR and CMD areas over `MIB_PERCENTAGES`, circuit sizes in percent of the
model's edges, and node/edge IoU between circuits. No model code: `jaxinterp.evaluation` runs the
model and uses these to summarise the results.

All bad input raises `GraphError` (a `ValueError`) with a message that names what is wrong.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import TYPE_CHECKING, Sequence

import numpy as np

from jaxinterp.circuits import layout
from jaxinterp.circuits.layout import GraphError

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
    raise GraphError("normalized_faithfulness: the full and empty circuits have the same metric, so "
                     "faithfulness is undefined")
  out = (c - e) / denom
  return float(out) if out.ndim == 0 else out


def _curve(percentages: Sequence[float], faithfulness: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  try:
    p = np.asarray(percentages, np.float64)
    f = np.asarray(faithfulness, np.float64)
  except (TypeError, ValueError) as e:
    raise GraphError(f"percentages and faithfulness must be sequences of numbers: {e}") from e
  if p.ndim != 1 or f.shape != p.shape or p.size < 2:
    raise GraphError(f"need two 1-D sequences of equal length >= 2, got shapes {p.shape}, {f.shape}")
  if not (np.isfinite(p).all() and np.isfinite(f).all()):
    raise GraphError("percentages and faithfulness must be finite")
  if (p <= 0).any() or (p > 100).any() or (np.diff(p) <= 0).any():
    raise GraphError(f"percentages must increase strictly within (0, 100], got {p.tolist()}")
  return p / 100.0, f


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
  return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def cpr(percentages: Sequence[float], faithfulness: Sequence[float]) -> float:
  """MIB's CPR: trapezoidal area under the faithfulness curve (higher is better).

  `percentages` are circuit sizes in percent of the model's edges (e.g. `MIB_PERCENTAGES`); the x
  axis is their fraction (percent / 100) on a linear scale, as in MIB's `evaluate_area_under_curve`
  (`log_scale=False`), so the area spans [x_first, x_last] and a constant curve f = 1 over
  `MIB_PERCENTAGES` gives 0.999. MIB computes CPR on circuits ranked by signed scores.
  """
  x, f = _curve(percentages, faithfulness)
  return _trapezoid(x, f)


def cmd(percentages: Sequence[float], faithfulness: Sequence[float]) -> float:
  """MIB's CMD: trapezoidal area under |1 - faithfulness| (lower is better); x axis as in `cpr`.

  MIB computes CMD on circuits ranked by absolute scores.
  """
  x, f = _curve(percentages, faithfulness)
  return _trapezoid(x, np.abs(1.0 - f))


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
