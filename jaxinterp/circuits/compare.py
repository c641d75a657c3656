"""How much two circuits' edge scores agree: top-k overlap, Spearman of |score|, IoU at equal sizes.

`compare(a, b, ks)` takes two graphs over one model shape (files of any method: the sign convention
does not matter, everything here ranks by |score|) and gives, over the edges valid in the model:

- `spearman`: Spearman's rank correlation of |score| (average ranks for ties);
- per size k: `top_k_overlap`, the fraction of A's k strongest edges that are among B's k strongest
  (ties broken by edge index, as `selection.ranked` does); `edge_iou` and `node_iou`
  (`mib.edge_iou`, `mib.node_iou`) of the two top-k circuits after pruning (`Graph.top_n(k)`), and
  the edges each keeps.

`compare_all(graphs, labels, ks)` does every pair; `write_csv` and `plot` save the rows (one per
pair and size) and a figure of the three curves against k, a line per pair, Spearman in the legend.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from jaxinterp.circuits import mib, selection
from jaxinterp.circuits.graph import Graph
from jaxinterp.circuits.layout import GraphError
from jaxinterp.runtime import files

DEFAULT_KS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Two graphs compared.

  Attributes:
    a, b: their labels.
    n_valid: the valid edges compared.
    spearman: Spearman's rho of |score| over the valid edges (NaN if one graph's |scores| are all
      equal).
    ks: the sizes (edges requested), ascending.
    top_k_overlap, edge_iou, node_iou: one value per size.
    edges_a, edges_b: the edges each top-k circuit keeps after pruning.
  """

  a: str
  b: str
  n_valid: int
  spearman: float
  ks: tuple[int, ...]
  top_k_overlap: tuple[float, ...]
  edge_iou: tuple[float, ...]
  node_iou: tuple[float, ...]
  edges_a: tuple[int, ...]
  edges_b: tuple[int, ...]

  def rows(self) -> list[dict]:
    """One dict per size: graph_a, graph_b, k, top_k_overlap, edge_iou, node_iou, edges_a,
    edges_b, spearman_abs, n_valid."""
    return [{"graph_a": self.a, "graph_b": self.b, "k": k, "top_k_overlap": o, "edge_iou": e,
             "node_iou": n, "edges_a": ea, "edges_b": eb, "spearman_abs": self.spearman,
             "n_valid": self.n_valid}
            for k, o, e, n, ea, eb in zip(self.ks, self.top_k_overlap, self.edge_iou,
                                          self.node_iou, self.edges_a, self.edges_b, strict=True)]


def average_ranks(x: np.ndarray) -> np.ndarray:
  """Float[ndarray, "n"]: 1-based ranks of `x`, ties sharing their mean rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], x.size]
  mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
  ranks = np.empty(x.size)
  ranks[order] = np.repeat(mean_rank, ends - starts)
  return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rank correlation of two equal-length vectors (NaN if either is constant)."""
  rx, ry = average_ranks(x), average_ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
  return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def sizes(n_valid: int, ks: Sequence[int] = DEFAULT_KS) -> tuple[int, ...]:
  """The sizes in `ks` that are at most `n_valid` (and `n_valid` itself when some are larger),
  ascending and distinct."""
  kept = sorted({int(k) for k in ks if 0 < k <= n_valid})
  if any(k > n_valid for k in ks) and n_valid not in kept:
    kept.append(n_valid)
  return tuple(kept)


def compare(a: Graph, b: Graph, ks: Sequence[int] = DEFAULT_KS, labels: tuple[str, str] = ("A", "B")
            ) -> Comparison:
  """Compare two graphs of one model shape (see the module docstring). GraphError for graphs of
  different shapes or sizes that are not positive."""
  if (a.scores.shape != b.scores.shape) or not np.array_equal(a.valid, b.valid):
    raise GraphError(f"{labels[0]} and {labels[1]} are graphs of different models "
                     f"({a.layout.describe()} vs {b.layout.describe()})")
  if any(int(k) < 1 for k in ks):
    raise GraphError(f"sizes must be positive edge counts, got {list(ks)}")
  valid = a.valid
  n_valid = int(valid.sum())
  sa, sb = np.abs(a.scores[valid]), np.abs(b.scores[valid])
  ra = selection.ranked(np.where(valid, a.scores, np.nan), absolute=True)
  rb = selection.ranked(np.where(valid, b.scores, np.nan), absolute=True)
  chosen = sizes(n_valid, ks)
  overlap, e_iou, n_iou, ea, eb = [], [], [], [], []
  for k in chosen:
    overlap.append(len(np.intersect1d(ra[:k], rb[:k], assume_unique=True)) / k)
    ca, cb = a.top_n(k, absolute=True), b.top_n(k, absolute=True)
    e_iou.append(mib.edge_iou(ca, cb))
    n_iou.append(mib.node_iou(ca, cb))
    ea.append(ca.count_edges())
    eb.append(cb.count_edges())
  return Comparison(labels[0], labels[1], n_valid, spearman(sa, sb), chosen, tuple(overlap),
                    tuple(e_iou), tuple(n_iou), tuple(ea), tuple(eb))


def compare_all(graphs: Sequence[Graph], labels: Sequence[str],
                ks: Sequence[int] = DEFAULT_KS) -> list[Comparison]:
  """`compare` for every pair (i < j) of `graphs`, in order."""
  return [compare(graphs[i], graphs[j], ks, (labels[i], labels[j]))
          for i, j in itertools.combinations(range(len(graphs)), 2)]


def table(c: Comparison) -> str:
  """The pair as printed: a header line with Spearman, then one line per size."""
  lines = [f"{c.a} vs {c.b}: Spearman of |score| {c.spearman:.3f} over {c.n_valid} valid edges",
           f"  {'k':>6}  {'top-k overlap':>13}  {'edge IoU':>8}  {'node IoU':>8}  "
           f"{'edges kept (A, B)':>17}"]
  for k, o, e, n, ea, eb in zip(c.ks, c.top_k_overlap, c.edge_iou, c.node_iou, c.edges_a,
                                c.edges_b, strict=True):
    lines.append(f"  {k:>6}  {o:>13.3f}  {e:>8.3f}  {n:>8.3f}  {f'{ea}, {eb}':>17}")
  return "\n".join(lines)


def write_csv(comparisons: Sequence[Comparison], path: str) -> None:
  """Every pair's rows (`Comparison.rows`) as one CSV, atomically."""
  files.atomic_write_csv(path, [r for c in comparisons for r in c.rows()])


def plot(comparisons: Sequence[Comparison], path: str, title: str = "") -> None:
  """Top-k overlap, edge IoU and node IoU against the size k (log scale), one line per pair
  (Spearman of |score| in its legend entry), saved as a PNG atomically."""
  fig = Figure(figsize=(13, 4.4), layout="constrained")
  axes = fig.subplots(1, 3, sharey=True)
  panels = (("top_k_overlap", "top-k overlap (shared of the k strongest edges)"),
            ("edge_iou", "edge IoU of the top-k circuits (pruned)"),
            ("node_iou", "node IoU of the top-k circuits (pruned)"))
  for ax, (field, name) in zip(axes, panels, strict=True):
    for c in comparisons:
      ax.plot(c.ks, getattr(c, field), marker="o", ms=3.5,
              label=f"{c.a} vs {c.b} (Spearman {c.spearman:.2f})")
    ax.set_xscale("log")
    ticks = sorted({k for c in comparisons for k in c.ks})
    ax.set_xticks(ticks, _tick_labels(ticks), minor=False)
    ax.set_xticks([], minor=True)
    ax.set_xlabel("k: edges requested (log scale)")
    ax.set_title(name, fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel("agreement (1 = identical)")
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
             ncol=min(len(comparisons), 3), fontsize=9, frameon=False)
  fig.suptitle(title or "Circuit agreement by size, ranked by |score|")
  files.atomic_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _tick_labels(ticks: Sequence[int]) -> list[str]:
  """Labels of log-scale ticks, blank where a tick sits within 30% of a larger labelled one."""
  labels, last = [], None
  for k in reversed(ticks):
    show = last is None or last / k >= 1.3
    labels.append(str(k) if show else "")
    last = k if show else last
  return labels[::-1]


def labels_for(paths: Sequence[str], metas: Sequence[dict]) -> list[str]:
  """A short label per graph: its meta's method (`EAP`, with the task when the tasks differ), or
  its directory's name where methods are missing or repeat, or the path itself as a last resort."""
  def method(m: dict) -> str | None:
    return m.get("method") if isinstance(m.get("method"), str) else None

  tasks = {m.get("task") for m in metas}
  labels = [method(m) + (f" ({m.get('task')})" if len(tasks) > 1 else "") if method(m) else None
            for m in metas]
  if None in labels or len(set(labels)) < len(labels):
    labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
  if len(set(labels)) < len(labels):
    labels = list(paths)
  return labels
