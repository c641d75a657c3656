"""Plots for circuits, faithfulness curves and patching heatmaps (matplotlib only, Agg backend).

Every function writes a PNG atomically: the figure is saved to a temporary file next to `path` and
renamed over it, so a crash never leaves a partial image. Bad input raises `PlotError`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib import ticker as mticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from jaxinterp.circuits import Graph, convention  # noqa: E402
from jaxinterp.runtime import files  # noqa: E402

POSITIVE_COLOR = "#1f5fb4"
NEGATIVE_COLOR = "#c4302b"
QKV_STYLES = {"q": (0, (5, 2)), "k": (0, (1, 1.5)), "v": (0, (6, 2, 1, 2)), None: "solid"}
SCORE_LEGEND = "score: " + textwrap.fill(convention.DISPLAYED, 34)
POSITIVE_LABEL = "score > 0: carries the behaviour"
NEGATIVE_LABEL = "score < 0: ablating it helps"
FAITHFULNESS_XLABEL = "requested size n: top-n edges by |score| (before pruning dangling edges)"
QKV_LABELS = {"q": "query input (dashed)", "k": "key input (dotted)", "v": "value input (dash-dot)",
              None: "MLP / logits input (solid)"}


class PlotError(ValueError):
  """Input that cannot be plotted."""


def figure(figsize: tuple[float, float]):
  """A new (figure, axes) of `figsize` inches on this module's non-interactive backend; pass the
  figure to `save_png`, which closes it."""
  return plt.subplots(figsize=figsize)


def save_png(fig, path: str) -> None:
  """Save `fig` as a PNG at `path` atomically (`files.atomic_with`); always closes the figure."""
  try:
    files.atomic_with(os.fspath(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                               bbox_inches="tight"), suffix=".png")
  except OSError as e:
    raise PlotError(f"cannot write {path}: {e}") from None
  finally:
    plt.close(fig)


# ------------------------------------------------------------------------------------------ circuit


def _node_positions(graph: Graph) -> dict[str, tuple[float, float]]:
  """(x, y) of every node: input at the bottom, per layer a row of heads then a row for the MLP,
  logits at the top. Heads spread over x in [0, 1]; MLPs sit to the right (x = 1.2) so that edges
  between heads do not run through them; input and logits sit in the middle."""
  L, H = graph.cfg.n_layers, graph.cfg.n_heads
  pos = {"input": (0.5, 0.0)}
  xs = [0.5] if H == 1 else list(np.linspace(0.0, 1.0, H))
  for li in range(L):
    for h in range(H):
      pos[f"a{li}.h{h}"] = (float(xs[h]), 2.0 * li + 1.0)
    pos[f"m{li}"] = (1.2, 2.0 * li + 2.0)
  pos["logits"] = (0.5, 2.0 * L + 1.0)
  return pos


def receiver_parts(name: str) -> tuple[str, str | None]:
  """'a1.h2<k>' -> ('a1.h2', 'k'); 'm0' -> ('m0', None)."""
  if name.endswith(">") and "<" in name:
    node, qkv = name[:-1].split("<")
    return node, qkv
  return name, None


def drawn_edges(graph: Graph, max_edges: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """What `plot_circuit` draws: (senders, receivers, scores) of the circuit's edges, the largest
  |score| first (at most `max_edges`), scores in graph.json's sign (`convention.displayed`).

  Returns Int[ndarray, "e"], Int[ndarray, "e"] and Float[ndarray, "e"] (the graph's dtype).
  """
  senders, receivers = np.nonzero(graph.in_graph)
  scores = convention.displayed(graph.scores, graph.score_convention)[senders, receivers]
  order = np.argsort(-np.abs(scores.astype(np.float64)), kind="stable")[:max_edges]
  return senders[order], receivers[order], scores[order]


def plot_circuit(graph: Graph, path: str, title: str = "", max_edges: int = 200) -> None:
  """Draw the circuit (`graph.in_graph`) as a layered graph and write it as a PNG.

  Input at the bottom, one row of heads and one MLP per layer, logits at the top. Scores are drawn
  in graph.json's sign whatever the graph's in-memory convention (`convention.displayed`: higher =
  more important), as the viewer and the console show them. Edge width grows with |score| and
  colour gives the sign (blue positive: the edge carries the behaviour; red negative: ablating it
  helps the behaviour), said in the legend; edges into a head's query,
  key and value inputs are dashed, dotted and dash-dotted (and end left of, at, and right of the
  head), edges into MLPs and logits are solid. Nodes of the circuit are drawn solid, the others
  faintly.

  Args:
    graph: a `Graph` with scores and an in-graph mask.
    path: the PNG to write.
    title: figure title (the edge count is appended).
    max_edges: draw at most this many in-graph edges, the largest |score| first.
  """
  if not isinstance(graph, Graph):
    raise PlotError(f"plot_circuit needs a jaxinterp.circuits.Graph, got {type(graph).__name__}")
  if not isinstance(max_edges, int) or max_edges < 1:
    raise PlotError(f"max_edges must be a positive integer, got {max_edges!r}")
  L, H = graph.cfg.n_layers, graph.cfg.n_heads
  pos = _node_positions(graph)
  n_total = int(graph.in_graph.sum())
  senders, receivers, scores = drawn_edges(graph, max_edges)
  scores = scores.astype(np.float64)

  width_in = min(24.0, max(6.0, 0.9 * H + 2.0))
  height_in = min(24.0, max(5.0, 1.3 * (2 * L + 2)))
  fig, ax = plt.subplots(figsize=(width_in, height_in))
  smax = float(np.max(np.abs(scores))) if scores.size else 0.0
  sender_names, receiver_names = graph.sender_names, graph.receiver_names
  dx = 0.25 / max(H, 2)  # q/k/v ends of an edge, left/centre/right of the head
  offsets = {"q": -dx, "k": 0.0, "v": dx, None: 0.0}
  shrink = 15 if H <= 8 else (11 if H <= 16 else 7)
  # Draw weak edges first so strong ones end up on top.
  for s, r, sc in list(zip(senders, receivers, scores, strict=True))[::-1]:
    src = pos[sender_names[s]]
    node, qkv = receiver_parts(receiver_names[r])
    dst = pos[node]
    dst = (dst[0] + offsets[qkv], dst[1])
    lw = 0.6 + 4.4 * (abs(sc) / smax if smax > 0 else 0.0)
    rad = 0.15 if abs(dst[0] - src[0]) < 1e-6 and dst[1] - src[1] > 1.5 else 0.05
    ax.add_patch(FancyArrowPatch(
        src, dst, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=8,
        linewidth=lw, linestyle=QKV_STYLES[qkv], alpha=0.75, shrinkA=shrink, shrinkB=shrink,
        color=POSITIVE_COLOR if sc >= 0 else NEGATIVE_COLOR, zorder=1))

  in_nodes = set(np.asarray(graph.sender_names)[graph.nodes_in_graph]) | {"logits", "input"}
  label_size = 8 if H <= 8 else (6 if H <= 16 else 4)
  size = 900 if H <= 8 else (500 if H <= 16 else 200)
  for name, (x, y) in pos.items():
    live = name in in_nodes
    kind = "mlp" if name.startswith("m") else ("head" if name.startswith("a") else "io")
    face = {"mlp": "#f2c14e", "head": "#9ecae1", "io": "#bdbdbd"}[kind]
    ax.scatter([x], [y], s=size if kind == "head" else 900, marker="s" if kind == "mlp"
               else "o", c=face if live else "#f0f0f0", edgecolors="black" if live else "#cccccc",
               linewidths=1.0, zorder=2)
    ax.annotate(name, (x, y), ha="center", va="center", fontsize=label_size, zorder=3,
                color="black" if live else "#aaaaaa")

  ax.set_xlim(-0.12, 1.32)
  ax.set_ylim(-0.7, 2.0 * L + 1.7)
  ax.set_yticks([2.0 * li + 1.0 for li in range(L)])
  ax.set_yticklabels([f"layer {li}" for li in range(L)])
  ax.set_xticks([])
  for side in ("top", "right", "bottom"):
    ax.spines[side].set_visible(False)
  handles = [Line2D([0], [0], color="black", linestyle=QKV_STYLES[k], lw=1.8, label=QKV_LABELS[k])
             for k in ("q", "k", "v", None)]
  handles += [Line2D([0], [0], color=POSITIVE_COLOR, lw=3, label=POSITIVE_LABEL),
              Line2D([0], [0], color=NEGATIVE_COLOR, lw=3, label=NEGATIVE_LABEL)]
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
            title=SCORE_LEGEND, title_fontsize=8, alignment="left")
  shown = f"{n_total} edges" if n_total <= max_edges else f"top {max_edges} of {n_total} edges"
  if n_total == 0:
    shown = "empty circuit"
  ax.set_title(f"{title} ({shown})" if title else shown)
  save_png(fig, path)


# ----------------------------------------------------------------------------------- faithfulness


def plot_faithfulness(curve: Any, path: str, title: str = "", *, label: str | None = None,
                      xlabel: str | None = None) -> None:
  """Faithfulness vs circuit size (edges, log x) with the full-model (1) and empty-circuit (0)
  lines. The x axis is the requested size n (`curve.n_edges`: the top n edges by |score|, before
  dangling edges are pruned; faithfulness.csv's `n_edges`), as its label says; the circuit
  evaluated at n keeps `n_edges_kept` <= n of them.

  Args:
    curve: an `evaluation.FaithfulnessCurve` (or anything with `n_edges`, `faithfulness`, `m_full`
      and `m_empty`).
    path: the PNG to write.
    title: figure title.
    label, xlabel: the curve's legend entry and the x axis label (default: top-n edges, pruned,
      `FAITHFULNESS_XLABEL`); position-level curves name their own.
  """
  try:
    n = np.asarray(curve.n_edges, np.float64).ravel()
    f = np.asarray(curve.faithfulness, np.float64).ravel()
  except (AttributeError, TypeError, ValueError) as e:
    raise PlotError(f"plot_faithfulness needs a FaithfulnessCurve: {e}") from None
  if n.shape != f.shape or n.size == 0:
    raise PlotError(f"the curve needs equally many sizes and values, got {n.size} and {f.size}")
  order = np.argsort(n, kind="stable")
  n, f = n[order], f[order]
  ok = np.isfinite(f)
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ax.plot(n[ok], f[ok], marker="o", color=POSITIVE_COLOR,
          label=label or "circuit (top-n edges, pruned)")
  ax.axhline(1.0, color="black", linestyle="--", lw=1, label=f"full model (m={curve.m_full:.3g})")
  ax.axhline(0.0, color="grey", linestyle=":", lw=1, label=f"empty circuit (m={curve.m_empty:.3g})")
  if np.all(n > 0):
    ax.set_xscale("log")
    ax.set_xlim(n.min() / 1.4, n.max() * 1.4)
  else:  # 0 edges on a log-like axis: linear up to 1, and nothing left of 0 (no negative counts)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(-0.15, max(n.max(), 1.0) * 1.4)
  ax.xaxis.set_major_formatter(mticker.FuncFormatter(
      lambda x, _: f"{x:,.0f}" if x >= 0 and abs(x - round(x)) < 1e-6 else ""))
  ax.set_xlabel(xlabel or FAITHFULNESS_XLABEL)
  ax.set_ylabel("normalised faithfulness")
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  if title:
    ax.set_title(_wrap(title, 6.4, 12))
  save_png(fig, path)


# ------------------------------------------------------------------------------------------ heatmap


def _wrap(text: str, width_in: float, fontsize: float) -> str:
  """`text` broken into lines that fit `width_in` inches at `fontsize` points."""
  chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
  return "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))


def _ticks(labels: Sequence[Any] | None, n: int, what: str) -> tuple[list[int], list[str]]:
  if labels is None:
    labels = [str(i) for i in range(n)]
  labels = [str(x) for x in labels]
  if len(labels) != n:
    raise PlotError(f"{what} has {len(labels)} labels for {n} columns/rows")
  step = max(1, math.ceil(n / 40))
  idx = list(range(0, n, step))
  return idx, [labels[i] for i in idx]


def plot_heatmap(values: np.ndarray, path: str, *, xlabel: str, ylabel: str, title: str,
                 xticklabels: Sequence[Any] | None = None,
                 yticklabels: Sequence[Any] | None = None, colorbar_label: str = "",
                 center: float = 0.0) -> None:
  """A 2-D heatmap with a diverging colormap centred at `center`, row 0 at the top.

  Args:
    values: Float[ndarray, "rows cols"]; NaNs are drawn blank.
    path: the PNG to write.
    xlabel, ylabel, title: axis labels and title.
    xticklabels, yticklabels: one label per column/row (default: indices).
    colorbar_label: label of the colour bar.
    center: the value drawn white (the colours span center +- the largest distance from it).
  """
  try:
    v = np.asarray(values, np.float64)
  except (TypeError, ValueError) as e:
    raise PlotError(f"heatmap values must be numbers: {e}") from None
  if v.ndim != 2 or 0 in v.shape:
    raise PlotError(f"heatmap values must be a non-empty 2-D array, got shape {v.shape}")
  rows, cols = v.shape
  xi, xl = _ticks(xticklabels, cols, "xticklabels")
  yi, yl = _ticks(yticklabels, rows, "yticklabels")
  finite = v[np.isfinite(v)]
  span = float(np.max(np.abs(finite - center))) if finite.size else 1.0
  span = span if span > 0 else 1.0
  fig, ax = plt.subplots(figsize=(min(20.0, max(5.0, 0.35 * cols + 2.5)),
                                  min(16.0, max(3.4, 0.4 * rows + 1.8))))
  im = ax.imshow(np.ma.masked_invalid(v), cmap="RdBu", aspect="auto",
                 norm=mcolors.TwoSlopeNorm(vcenter=center, vmin=center - span,
                                           vmax=center + span),
                 interpolation="nearest")
  if rows * cols <= 144 and cols <= 16:
    for i in range(rows):
      for j in range(cols):
        if np.isfinite(v[i, j]):
          ax.text(j, i, f"{v[i, j]:.2f}", ha="center", va="center", fontsize=7,
                  color="white" if abs(v[i, j] - center) > 0.6 * span else "black")
  ax.set_xticks(xi)
  ax.set_xticklabels(xl, rotation=90 if max((len(s) for s in xl), default=0) > 3 else 0, fontsize=8)
  ax.set_yticks(yi)
  ax.set_yticklabels(yl, fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  fig_w, fig_h = fig.get_size_inches()
  ax.set_title(_wrap(title, 0.75 * fig_w, 10), fontsize=10)  # the axes' width: clear of the bar
  cb = fig.colorbar(im, ax=ax)
  if colorbar_label:  # fits the bar's height, so it never reaches the title
    cb.set_label(_wrap(colorbar_label, 0.7 * fig_h, 8), fontsize=8)
  save_png(fig, path)


AXIS_NAMES = {"position": "position", "head": "head", "kv_head": "key/value head",
              "layer": "layer"}
NORMALIZED = "(m - m_corrupted) / (m_clean - m_corrupted)"
"""The one normalised patching number the console, the PNG and the .npz (`normalized`) show."""


@dataclasses.dataclass(frozen=True)
class PatchingGrid:
  """What `plot_patching` draws: the sweep's `normalized` values laid out as a 2-D grid.

  Attributes:
    values: Float[ndarray, "rows cols"], `result.normalized` itself (2-D sweeps) or its
      [layer, position, head] cube with one row per (layer, head); never rescaled.
    neutral: the value of a cell that has no effect (1 when noising, 0 when denoising), where the
      colour map is white.
    row_labels, col_labels: one label per row / column (None: indices).
    xlabel, ylabel: the axes' names.
  """

  values: np.ndarray
  neutral: float
  row_labels: list[str] | None
  col_labels: list[str] | None
  xlabel: str
  ylabel: str


def patching_grid(result: Any, position_labels: Sequence[Any] | None = None) -> PatchingGrid:
  """The grid `plot_patching` draws for a `patching.PatchingResult` (see `PatchingGrid`)."""
  v = np.asarray(result.normalized, np.float64)
  labels = tuple(result.axis_labels)
  neutral = 1.0 if result.direction == "noising" else 0.0
  if v.ndim == 2:
    xt = list(position_labels) if labels[1] == "position" and position_labels is not None else None
    return PatchingGrid(v, neutral, None, xt, AXIS_NAMES.get(labels[1], labels[1]), "layer")
  if v.ndim == 3 and labels[1:] == ("position", "head"):
    Lr, P, Hh = v.shape
    rows = np.transpose(v, (0, 2, 1)).reshape(Lr * Hh, P)
    return PatchingGrid(rows, neutral, [f"a{li}.h{h}" for li in range(Lr) for h in range(Hh)],
                        None if position_labels is None else list(position_labels), "position",
                        "layer.head")
  raise PlotError(f"cannot plot a sweep with axes {labels} and shape {v.shape}")


def plot_patching(result: Any, path: str, title: str = "",
                  position_labels: Sequence[Any] | None = None) -> None:
  """Heatmap of a `patching.PatchingResult`: each cell's normalised metric, as the console prints
  it and the .npz stores it (`normalized`).

  One number under one definition: `NORMALIZED`, 1 for the clean run's behaviour and 0 for the
  corrupted run's. The colour map is centred on the value of "no effect" (`PatchingGrid.neutral`:
  1 when noising, where a cell near 0 carries the clean behaviour; 0 when denoising, where a cell
  near 1 restores it), so white is "no effect" and strong colours are the cells that matter; the
  colour bar says which. 2-D sweeps are drawn as layer x position/head (key/value heads for a GQA
  model's k/v sweeps); `head_out_by_pos` ([layer, pos, head]) with one row per (layer, head) and
  positions as columns (`patching_grid`).

  Args:
    result: a `PatchingResult`.
    path: the PNG to write.
    title: title prefix (the sweep, direction and baselines are appended).
    position_labels: labels of the positions (e.g. the first prompt's decoded tokens).
  """
  grid = patching_grid(result, position_labels)
  name = result.sweep.name
  full = (f"{title + ': ' if title else ''}{name} ({result.direction})\n"
          f"clean={result.m_clean:.3g}, corrupted={result.m_corrupted:.3g}")
  cbar = (f"normalised metric {NORMALIZED}\n1: clean behaviour, 0: corrupted; "
          f"white = no effect ({grid.neutral:g}, {result.direction})")
  plot_heatmap(grid.values, path, xlabel=grid.xlabel, ylabel=grid.ylabel, title=full,
               xticklabels=grid.col_labels, yticklabels=grid.row_labels, colorbar_label=cbar,
               center=grid.neutral)
