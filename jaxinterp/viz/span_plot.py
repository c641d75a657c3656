"""Drawing a span-level circuit: its span edges between the schema's span columns.

One column per span of the schema (`circuits.schemas`), in the schema's order, every span drawn
whether an edge touches it or not; a column is labelled with the span's name and, when given, the
tokens of one row in it. The rows are `position_plot`'s: `input` at the bottom, per layer a row
for its heads (a head at an offset of its index inside the column) and a row for its MLP, `logits`
at the top. Crossing edges (a sender in a key span read by a head's k or v input in a query span)
run between columns; the other span edges stay within their span's column. Colour, width and line
styles are `position_plot.draw_columns`'s: blue positive, red negative in graph.json's sign
(higher = more important), width by |score|, q/k/v dashed, dotted, dash-dotted. At most
`MAX_DRAWN_SPAN_EDGES` edges are drawn (the circuit's first ones: its best, in `select`'s order);
the title says how many of how many.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxinterp.circuits.layout import GraphError
from jaxinterp.circuits.schemas import SpanScores, span_edge_name
from jaxinterp.viz import plots, position_plot

MAX_DRAWN_SPAN_EDGES = 40  # circuit.png of a span circuit draws at most these
MAX_LABEL_TOKENS = 4  # a column's label shows at most these tokens of its span

# (sender, sender span, receiver, receiver span, score): `span_circuits.select` rows.
Edge = tuple[int, int, int, int, float]


def span_tokens(spans: np.ndarray, tokens: Sequence[str]) -> list[list[str]]:
  """The tokens of each span of one row: `spans` Int[ndarray, "span 2"] ([start, end) of each
  span, as `schemas.dataset_spans` gives per row), `tokens` the row's token labels."""
  spans = np.asarray(spans)
  if spans.ndim != 2 or spans.shape[1] != 2:
    raise plots.PlotError(f"spans of shape {spans.shape}: expected [span, 2]")
  if int(spans.max(initial=0)) > len(tokens):
    raise plots.PlotError(f"spans reach position {int(spans.max())}, past the row's "
                          f"{len(tokens)} tokens")
  return [[str(t) for t in tokens[int(a):int(b)]] for a, b in spans]


def span_label(name: str, tokens: Sequence[str] | None) -> str:
  """A column's label: the span's name, then (given) its tokens, at most `MAX_LABEL_TOKENS` of
  them (`first second … last (n)` when longer), `(empty)` for an empty span."""
  if tokens is None:
    return name
  if not tokens:
    return f"{name}\n(empty)"
  if len(tokens) <= MAX_LABEL_TOKENS:
    return f"{name}\n{' '.join(tokens)}"
  shown = tokens[:MAX_LABEL_TOKENS - 2]
  return f"{name}\n{' '.join(shown)} … {tokens[-1]} ({len(tokens)})"


def plot_span_circuit(scores: SpanScores, edges: Sequence[Edge], path: str, *,
                      tokens: Sequence[Sequence[str]] | None = None, title: str = "",
                      max_edges: int = MAX_DRAWN_SPAN_EDGES) -> list[Edge]:
  """Draw the span circuit `edges` (rows of `span_circuits.select`) and write it as a PNG.

  Args:
    scores: the run's `SpanScores` (its layout names the nodes, its span names the columns; its
      convention signs the scores, drawn in graph.json's sign whatever it is).
    edges: the circuit's span edges as (sender, sender span, receiver, receiver span, score),
      best first; the first `max_edges` are drawn.
    path: the PNG to write.
    tokens: optional, one list per span of the tokens shown under its name (e.g. row 0's,
      `span_tokens`).
    title: figure title (the drawn and total edge counts are appended).
    max_edges: how many edges to draw at most.

  Returns:
    The edges drawn: `edges[:max_edges]`, as given.
  """
  if not isinstance(scores, SpanScores):
    raise plots.PlotError(f"plot_span_circuit needs SpanScores, got {type(scores).__name__}")
  names, lay = tuple(scores.names), scores.layout
  if tokens is not None and len(tokens) != len(names):
    raise plots.PlotError(f"tokens: {len(tokens)} lists for {len(names)} spans")
  if max_edges < 0:
    raise plots.PlotError(f"max_edges: {max_edges} < 0")
  drawn = [tuple(e) for e in edges[:max_edges]]
  for s, a, r, b, _ in drawn:
    if not (0 <= a < len(names) and 0 <= b < len(names)):
      raise plots.PlotError(f"edge {lay.edge_name(s, r)} from span {a} to span {b}: the schema "
                            f"has {len(names)} spans")
    try:
      span_edge_name(lay, names, s, a, r, b)
    except GraphError as e:
      raise plots.PlotError(str(e)) from None
  count = f"{len(drawn)} of {len(edges)} span edges drawn"
  position_plot.draw_columns(
      lay, scores.convention, drawn, list(range(len(names))), path,
      labels=[span_label(n, None if tokens is None else tokens[i]) for i, n in enumerate(names)],
      xlabel="span, in the schema's order" + (" (name, then its tokens)" if tokens is not None
                                               else ""),
      title=f"{title}\n{count}" if title else count, width=1.7, label_size=8)
  return drawn
