"""Drawing a position-level circuit: its edges between token-position columns.

One column per token position an edge touches (labelled with the token when given), one row per
node kind and layer: `input` at the bottom, per layer a row for its heads and a row for its MLP,
`logits` at the top. A head sits in its layer's row at an offset of its index inside the column
(labelled `h{h}`; the row names the layer), so an edge names its sender and receiver by where it
starts and ends. Crossing edges (a sender at key position j read by a head's k or v input at query
position i) run between columns; the others stay in one. Colour, width and line styles follow
`plots.plot_circuit`: blue positive, red negative in graph.json's sign (higher = more important),
width by |score|, q/k/v dashed, dotted, dash-dotted. `draw_columns` draws any such columns (also
`viz.span_plot`'s span columns).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch

from jaxinterp.circuits import convention
from jaxinterp.circuits.layout import Layout
from jaxinterp.circuits.positions import PositionScores
from jaxinterp.viz import plots

# (sender, sender position, receiver, receiver position, score): `PositionScores.select` rows.
Edge = tuple[int, int, int, int, float]


def _place(name: str, n_heads: int) -> tuple[float, float]:
  """(x offset inside the column, y) of a node by name: input 0, a{l} at 2l+1, m{l} at 2l+2."""
  if name == "input":
    return 0.0, 0.0
  if name.startswith("a"):
    layer, head = (int(x) for x in name[1:].split(".h"))
    return 0.72 * (head + 0.5) / n_heads - 0.36, 2.0 * layer + 1.0
  if name.startswith("m"):
    return 0.0, 2.0 * int(name[1:]) + 2.0
  return 0.0, None  # logits: placed by the caller, above the last layer


def plot_position_circuit(scores: PositionScores, edges: Sequence[Edge], path: str, *,
                          tokens: Sequence[str] | None = None, title: str = "") -> None:
  """Draw the position-level circuit `edges` (rows of `scores.select`) and write it as a PNG.

  Args:
    scores: the run's `PositionScores` (its layout names the nodes; its convention signs the
      scores, drawn in graph.json's sign whatever it is).
    edges: the circuit's edges as (sender, sender position, receiver, receiver position, score).
    path: the PNG to write.
    tokens: optional labels of the positions (e.g. the decoded prompt of one row).
    title: figure title (the edge count is appended).
  """
  if not isinstance(scores, PositionScores):
    raise plots.PlotError(f"plot_position_circuit needs PositionScores, got "
                          f"{type(scores).__name__}")
  n_pos = scores.n_pos
  if tokens is not None and len(tokens) != n_pos:
    raise plots.PlotError(f"tokens: {len(tokens)} labels for {n_pos} positions")
  used = sorted({p for e in edges for p in (e[1], e[3])})
  cols = used if used else list(range(n_pos))
  n = len(edges)
  draw_columns(scores.layout, scores.convention, edges, cols, path,
               labels=[f"{p}\n{tokens[p]!s}" if tokens is not None else str(p) for p in cols],
               xlabel="token position (only positions an edge touches)",
               title=f"{title} ({n} position edges)" if title else f"{n} position edges")


def draw_columns(lay: Layout, score_convention: str, edges: Sequence[Edge], cols: Sequence[int],
                 path: str, *, labels: Sequence[str], xlabel: str, title: str,
                 width: float = 1.5, label_size: float = 8) -> None:
  """Draw `edges` between columns and write the PNG (the module docstring's drawing).

  Args:
    lay: the graph layout naming the edges' senders and receivers.
    score_convention: the convention of the edges' scores (drawn in graph.json's sign).
    edges: (sender, sender column key, receiver, receiver column key, score) rows; every key in
      `cols`.
    cols: the column keys drawn, left to right (token positions, span indices).
    path: the PNG to write.
    labels: one x tick label per column.
    xlabel, title: the x axis label and the figure title, as given.
    width: inches per column; label_size: the x tick labels' font size.
  """
  L, H = lay.n_layers, lay.n_heads
  top_y = 2.0 * L + 1.0

  def where(node: str, p: int) -> tuple[float, float]:
    dx, y = _place(node, H)
    return p + dx, top_y if y is None else y

  shown = np.array([convention.displayed(e[4], score_convention) for e in edges], np.float64)
  smax = float(np.abs(shown).max()) if len(edges) else 0.0
  fig_w = min(26.0, max(7.0, width * len(cols) + 3.0))
  fig, ax = plots.figure((fig_w, min(16.0, max(4.5, 0.9 * (2 * L + 2)))))
  # Only the columns in `cols` are drawn, side by side, labelled with `labels`.
  x_of = {p: i for i, p in enumerate(cols)}
  nodes = set()
  order = np.argsort(np.abs(shown))  # weak edges first, strong ones on top
  for k in order.tolist():
    s, ps, r, pr, _ = edges[k]
    rname = lay.receiver_names[r]
    node, qkv = plots.receiver_parts(rname)
    (sx, sy), (rx, ry) = where(lay.sender_names[s], ps), where(node, pr)
    sx, rx = x_of[ps] + sx - ps, x_of[pr] + rx - pr
    nodes.update({(lay.sender_names[s], ps), (node, pr)})
    lw = 0.8 + 4.2 * (abs(shown[k]) / smax if smax > 0 else 0.0)
    ax.add_patch(FancyArrowPatch(
        (sx, sy), (rx, ry), connectionstyle="arc3,rad=0.08", arrowstyle="-|>", mutation_scale=9,
        linewidth=lw, linestyle=plots.QKV_STYLES[qkv], alpha=0.8, shrinkA=7, shrinkB=7,
        color=plots.POSITIVE_COLOR if shown[k] >= 0 else plots.NEGATIVE_COLOR, zorder=1))
  for name, p in sorted(nodes):
    x, y = where(name, p)
    x = x_of[p] + x - p
    kind = "mlp" if name.startswith("m") else ("head" if name.startswith("a") else "io")
    ax.scatter([x], [y], s=260, marker="s" if kind == "mlp" else "o", zorder=2,
               c={"mlp": "#f2c14e", "head": "#9ecae1", "io": "#bdbdbd"}[kind],
               edgecolors="black", linewidths=0.8)
    label = name.split(".")[1] if kind == "head" else name  # the row names the layer
    ax.annotate(label, (x, y), xytext=(0, 9), textcoords="offset points", ha="center",
                fontsize=7, zorder=3)
  ax.set_xlim(-0.7, len(cols) - 0.3)
  ax.set_ylim(-0.8, top_y + 0.8)
  ax.set_xticks(range(len(cols)))
  ax.set_xticklabels(labels, fontsize=label_size)
  ax.set_xlabel(xlabel)
  ax.set_yticks([0.0] + [v for li in range(L) for v in (2.0 * li + 1.0, 2.0 * li + 2.0)]
                + [top_y])
  ax.set_yticklabels(["input"] + [t for li in range(L) for t in (f"attn {li}", f"mlp {li}")]
                     + ["logits"], fontsize=8)
  for x in range(len(cols)):
    ax.axvline(x, color="#eeeeee", lw=0.8, zorder=0)
  for side in ("top", "right"):
    ax.spines[side].set_visible(False)
  handles = [Line2D([0], [0], color="black", linestyle=plots.QKV_STYLES[k], lw=1.8,
                    label=plots.QKV_LABELS[k]) for k in ("q", "k", "v", None)]
  handles += [Line2D([0], [0], color=plots.POSITIVE_COLOR, lw=3, label=plots.POSITIVE_LABEL),
              Line2D([0], [0], color=plots.NEGATIVE_COLOR, lw=3, label=plots.NEGATIVE_LABEL)]
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
            frameon=False, title=plots.SCORE_LEGEND, title_fontsize=8, alignment="left")
  ax.set_title(title)
  plots.save_png(fig, path)
