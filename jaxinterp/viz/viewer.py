"""The interactive circuit viewer: one self-contained, offline HTML page per graph.

    viewer.write_html(graph, "runs/x/circuit.html", curve="runs/x/faithfulness.csv")

The page lays the EAP-IG graph out as `plots.plot_circuit` does (input at the bottom, per layer a
row of heads and then the MLP to their right, logits at the top) and draws the top-n circuit in SVG:
colour by sign, width by |score|, q/k/v inputs told apart by dash pattern and by where they end on
the head. A slider, a number input and MIB's percentages set the size n; hovering an edge shows its
name, score and rank; clicking a node lists its edges in the circuit; the faithfulness curve, when
given, sits beside the graph with the full and empty baselines and the value at the current size.

What is drawn for size n is exactly `graph.top_n(n)` (absolute ranking, pruned): the top-n edge sets
are nested and pruning is monotone, so each edge has a smallest n from which it is in the pruned
circuit (`entry_sizes`), and the circuit at n is the edges whose entry size is <= n. The page ships
the edges sorted by that size and draws a prefix, so any n is exact with no pruning in JavaScript.
Scores are shown as graph.json holds them (higher = more important, `convention.displayed`), blue
positive and red negative, as `plots.plot_circuit` draws them.

The page is plain JavaScript and SVG (`jaxinterp/viz/assets/`), inlined with the data into one
file: no library, no CDN, no network request. Bad input raises `ViewerError` (a `GraphError`).
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxinterp.circuits import (
    MIB_PERCENTAGES,
    Graph,
    GraphError,
    convention,
    n_edges_at_percentage,
)
from jaxinterp.runtime import files

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
MAX_DRAWN = 3000
"""Default cap on drawn edges: larger circuits draw their strongest edges and say so."""

CURVE_COLUMNS = ("n_edges", "faithfulness")
"""Columns a faithfulness CSV must have (`find_circuit` also writes n_edges_kept, percentage,
metric)."""

CurveLike = str | os.PathLike | Sequence[Mapping[str, Any]] | Any


class ViewerError(GraphError):
  """Input the viewer cannot show (a bad graph, curve or size), or a page it cannot write."""


# ------------------------------------------------------------------------------------------ sizes


def ranks(graph: Graph) -> np.ndarray:
  """Int[ndarray, "sender receiver"]: each valid edge's rank by |score| (1 = best), ties broken by
  edge index exactly as `selection.top_n` breaks them; 0 on invalid edges."""
  idx = np.flatnonzero(graph.valid)
  key = np.abs(graph.scores).ravel()[idx]
  out = np.zeros(graph.valid.size, np.int64)
  out[idx[np.lexsort((idx, -key))]] = np.arange(1, idx.size + 1)
  return out.reshape(graph.valid.shape)


def entry_sizes(graph: Graph) -> np.ndarray:
  """Int[ndarray, "sender receiver"]: the smallest n with the edge in `graph.top_n(n)` (pruned).

  An edge (s -> r) is in the pruned top-n circuit when it is among the top n by |score| and its
  circuit lies on an input -> logits path: the input reaches s and r's node reaches the logits
  through top-n edges. Each condition holds from some n on, so the entry size is the largest of the
  edge's own rank, the bottleneck rank of the best input -> s path and that of the best path from
  r's node to the logits (minimax paths over the DAG, in topological order). Invalid edges get 0.
  """
  L = graph.layout
  S = L.n_senders
  rank = np.where(L.valid, ranks(graph), np.inf)  # n at which each edge enters the unpruned top-n
  node = L.receiver_node
  reach_from_input = np.full(S + 1, np.inf)
  reach_from_input[0] = 0
  for t in range(1, S + 1):  # senders are in topological order; logits (S) last
    rs = L.receivers_of[t]
    reach_from_input[t] = np.min(np.maximum(reach_from_input[:S, None], rank[:, rs]))
  reach_logits = np.full(S + 1, np.inf)
  reach_logits[S] = 0
  for s in range(S - 1, -1, -1):
    reach_logits[s] = np.min(np.maximum(reach_logits[node], rank[s]))
  entry = np.maximum(rank, np.maximum(reach_from_input[:S, None], reach_logits[node][None, :]))
  return np.where(L.valid, entry, 0).astype(np.int64)


def mib_sizes(n_total: int) -> list[tuple[float, int]]:
  """(percentage, n) for MIB's circuit sizes: n = floor(percentage / 100 * n_total) edges."""
  return [(p, n_edges_at_percentage(p, n_total)) for p in MIB_PERCENTAGES]


# ------------------------------------------------------------------------------------------ curve


def read_curve(path: str | os.PathLike) -> list[dict[str, float]]:
  """The rows of a faithfulness CSV (`find_circuit`/`evaluate_circuit`'s `faithfulness.csv`).

  Needs the columns `n_edges` and `faithfulness`; `n_edges_kept`, `percentage` and `metric` are
  kept when present. ViewerError names the file and the row of anything unreadable.
  """
  path = os.fspath(path)
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      missing = [c for c in CURVE_COLUMNS if c not in (reader.fieldnames or [])]
      if missing:
        found = [name[:24] for name in (reader.fieldnames or [])[:6]]
        raise ViewerError(f"{path}: a faithfulness CSV needs the column(s) {missing}; its header "
                          f"starts {found}" if found else f"{path}: a faithfulness CSV needs the "
                          f"column(s) {missing}; it has no header")
      rows = []
      for i, row in enumerate(reader, start=2):
        try:
          rows.append({k: float(v) for k, v in row.items()
                       if k in CURVE_COLUMNS + ("n_edges_kept", "percentage", "metric")})
        except (TypeError, ValueError):
          raise ViewerError(f"{path}: line {i} has a value that is not a number") from None
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ViewerError(f"cannot read faithfulness CSV {path}: {e}") from None
  return rows


def _curve_data(curve: CurveLike, n_total: int) -> dict[str, Any] | None:
  """The curve as parallel lists sorted by size, checked against the graph's edge count."""
  if curve is None:
    return None
  where = "curve"
  if isinstance(curve, (str, os.PathLike)):
    where = os.fspath(curve)
    rows = read_curve(curve)
  elif hasattr(curve, "rows"):
    rows = curve.rows()
  else:
    rows = list(curve)
  out: dict[str, list] = {"n": [], "faithfulness": [], "kept": [], "metric": []}
  for row in rows:
    try:
      n, f = row["n_edges"], float(row["faithfulness"])
    except (KeyError, TypeError, ValueError):
      raise ViewerError(f"{where}: each row needs numeric n_edges and faithfulness, got {row!r}") \
          from None
    if not (isinstance(n, numbers.Real) and float(n).is_integer() and 0 <= n <= n_total):
      shown = f"{n:g}" if isinstance(n, numbers.Real) else repr(n)
      raise ViewerError(f"{where}: n_edges={shown} is not an edge count in [0, {n_total}] (is the "
                        "curve from another model's graph?)")
    if not math.isfinite(f):
      raise ViewerError(f"{where}: faithfulness at n_edges={int(n)} is not finite")
    out["n"].append(int(n))
    out["faithfulness"].append(f)
    kept, metric = _finite(row.get("n_edges_kept")), _finite(row.get("metric"))
    out["kept"].append(None if kept is None else int(kept))
    out["metric"].append(metric)
  if not out["n"]:
    return None
  order = np.argsort(out["n"], kind="stable")
  return {k: [v[i] for i in order] for k, v in out.items()}


def _finite(x: Any) -> float | None:
  """`x` as a float if it is a finite real number (not a bool), else None."""
  ok = isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
  return float(x) if ok else None


def _baselines(graph: Graph, curve: CurveLike) -> dict[str, float | None]:
  """The full-model and empty-circuit metrics, from the curve object or the graph's meta."""
  found = {}
  for name, keys in (("full", ("m_full", "metric_full")), ("empty", ("m_empty", "metric_empty"))):
    candidates = [getattr(curve, keys[0], None)] + [graph.meta.get(k) for k in keys]
    found[name] = _finite(next((v for v in candidates if v is not None), None))
  return found


# ------------------------------------------------------------------------------------------- page


def node_positions(graph: Graph) -> list[tuple[float, float]]:
  """(x, y) in page pixels of every node (senders, then logits), y growing downwards.

  As `plots.plot_circuit`: input at the bottom, per layer a row of heads then a half row up the MLP
  to the right of the heads, logits at the top.
  """
  L = graph.layout
  n_layers, n_heads = L.n_layers, L.n_heads
  dx = max(40.0, min(96.0, 640.0 / n_heads))
  dy = 30.0 if n_layers > 4 else 44.0
  top = 30.0
  width = (n_heads - 1) * dx

  def y(u):  # u: 0 = input ... 2L+1 = logits
    return top + (2 * n_layers + 1 - u) * dy

  pos = {"input": (width / 2, y(0)), "logits": (width / 2, y(2 * n_layers + 1))}
  for li in range(n_layers):
    for h in range(n_heads):
      pos[f"a{li}.h{h}"] = (h * dx, y(2 * li + 1))
    pos[f"m{li}"] = (width + max(0.9 * dx, 70.0), y(2 * li + 2))
  return [(round(pos[name][0] + 40.0, 1), round(pos[name][1], 1)) for name in L.node_names]


def page_data(graph: Graph, *, curve: CurveLike = None, title: str | None = None,
              n: int | None = None, max_drawn: int = MAX_DRAWN) -> dict[str, Any]:
  """Everything the page shows, as JSON-ready values (edge scores as a float32 array).

  Scores are shown in graph.json's sign whatever the graph's in-memory convention
  (`convention.displayed`: higher = more important), as the plots and the console show them; the
  legend says so (`score_legend`). Edges are listed in the order the page draws its prefixes: by
  entry size, then by rank. `n` is the
  initial circuit size (default: the graph's meta `top_n`, else its circuit's edge count, else 1% of
  the edges).
  """
  if not isinstance(graph, Graph):
    raise ViewerError(f"the viewer needs a jaxinterp Graph, got {type(graph).__name__}")
  if isinstance(max_drawn, bool) or not isinstance(max_drawn, numbers.Integral) or max_drawn < 1:
    raise ViewerError(f"max_drawn must be a positive integer, got {max_drawn!r}")
  L = graph.layout
  N = graph.n_edges
  s_idx, r_idx = np.nonzero(L.valid)
  shown = convention.displayed(graph.scores, graph.score_convention)  # graph.json's sign
  scores, rank = shown[s_idx, r_idx], ranks(graph)[s_idx, r_idx]
  e = entry_sizes(graph)[s_idx, r_idx]
  order = np.lexsort((rank, e))
  if n is None:
    top = graph.meta.get("top_n")
    n = (top if isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= N
         else graph.count_edges() or n_edges_at_percentage(1.0, N))
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= N:
    raise ViewerError(f"the initial circuit size n={n!r} is not an edge count in [0, {N}]")
  kinds = {"q": 0, "k": 1, "v": 2}
  receivers = [(int(L.receiver_node[r]), kinds.get(name[-2], 3) if name.endswith(">") else 3)
               for r, name in enumerate(L.receiver_names)]
  meta = {k: graph.meta[k] for k in ("model", "task", "method", "intervention", "n_examples")
          if isinstance(graph.meta.get(k), str) or _finite(graph.meta.get(k)) is not None}
  return {
      "title": title or "circuit", "n_total": N, "n": int(n), "max_drawn": int(max_drawn),
      "shape": {"n_layers": L.n_layers, "n_heads": L.n_heads, "parallel": L.parallel},
      "nodes": list(L.node_names), "pos": node_positions(graph),
      "receivers": receivers, "receiver_names": list(L.receiver_names),
      "edges": {"s": s_idx[order].tolist(), "r": r_idx[order].tolist(),
                "score": scores[order], "rank": rank[order].tolist(), "entry": e[order].tolist()},
      "stored_in_graph": graph.count_edges(), "mib": mib_sizes(N), "meta": meta,
      "curve": _curve_data(curve, N), "baselines": _baselines(graph, curve),
      "score_legend": convention.DISPLAYED,
  }


def _json(value: Any) -> str:
  """Compact JSON; float32 arrays as their shortest round-tripping decimals."""
  if isinstance(value, np.ndarray):
    return "[" + ",".join(str(x) for x in value.astype(np.float32)) + "]"
  if isinstance(value, dict):
    return "{" + ",".join(f"{json.dumps(k)}:{_json(v)}" for k, v in value.items()) + "}"
  return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _asset(name: str) -> str:
  try:
    with open(os.path.join(ASSET_DIR, name), encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise ViewerError(f"the viewer's asset {name} is missing from {ASSET_DIR}: {e}") from None


def render_html(graph: Graph, *, curve: CurveLike = None, title: str | None = None,
                n: int | None = None, max_drawn: int = MAX_DRAWN) -> str:
  """The page as one HTML string: the template with its CSS, JavaScript and data inlined.

  Args:
    graph: the scored graph (every valid edge's score; its own circuit is not needed).
    curve: the faithfulness curve: a `faithfulness.csv` path, a `FaithfulnessCurve` or rows with
      `n_edges` and `faithfulness`; None shows no curve.
    title: the page's heading (default "circuit").
    n: the initial circuit size (see `page_data`).
    max_drawn: draw at most this many edges; larger circuits draw their strongest edges.
  """
  data = _json(page_data(graph, curve=curve, title=title, n=n, max_drawn=max_drawn))
  data = data.replace("</", "<\\/").replace("<!--", "<\\!--")  # cannot close the script element
  parts = {"/*__CSS__*/": _asset("viewer.css"), "/*__JS__*/": _asset("viewer.js"),
           "/*__DATA__*/": data, "__TITLE__": _escape(title or "circuit")}
  # One pass, so that no inserted text is searched for the other marks.
  return re.sub("|".join(re.escape(m) for m in parts), lambda m: parts[m.group(0)],
                _asset("viewer.html"))


def _escape(text: str) -> str:
  return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
          .replace('"', "&quot;"))


def write_html(graph: Graph, path: str | os.PathLike, *, curve: CurveLike = None,
               title: str | None = None, n: int | None = None,
               max_drawn: int = MAX_DRAWN) -> None:
  """Write `render_html(...)` to `path` atomically (a temp file renamed over it).

  Everything is computed before anything is written, so bad input leaves no file behind.
  """
  page = render_html(graph, curve=curve, title=title, n=n, max_drawn=max_drawn)
  try:
    files.atomic_write_text(path, page)
  except OSError as e:
    raise ViewerError(f"cannot write {os.fspath(path)}: {e}") from None
