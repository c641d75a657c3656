"""The position-level circuit viewer: one self-contained, offline HTML page per position graph.json.

    position_viewer.write_html("runs/x/graph.json", "runs/x/circuit.html", tokens=row0_ids)

Reads `find_circuit --level=position`'s graph.json (`circuits.positions.to_json`: named position
edges such as `a0.h3@16->a1.h0<k>@31`, graph.json's sign) and draws it as `position_plot` draws
circuit.png: one row per node kind and layer (`input` at the bottom, per layer its heads then its
MLP, `logits` at the top), one column per token position an edge touches (labelled with the
position and, when given, its token), so local edges stay in a column and crossing edges run from
key column j to query column i. Colour is the sign in graph.json's sign (blue positive, red
negative: higher = more important), width grows as sqrt(|score| / max |score|), and the q, k and v
inputs are dashed, dotted and dash-dotted as in the PNG. Hovering an edge shows its name and
score, clicking a node lists its in- and out-edges.

The page is the attribution-graph viewer's (`graph_viewer`, its assets) in its position mode: the
data below carries the row names, column positions, edge names and q/k/v styles it reads.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxinterp.circuits import GraphError, convention
from jaxinterp.circuits import positions as P
from jaxinterp.circuits.layout import GraphShape, layout_for, shape_key
from jaxinterp.runtime import files, inputs
from jaxinterp.viz import graph_viewer, plots

MAX_DRAWN = 3000  # draw at most this many edges (the strongest by |score|)


class PositionViewerError(ValueError):
  """A position graph.json the viewer cannot draw, or a page it cannot write."""


def is_position_graph(path: str | os.PathLike) -> bool:
  """Whether `path` is a position-level graph.json (`circuits.positions.to_json`'s format)."""
  try:
    return read_graph(path).get("format") == P.FORMAT
  except PositionViewerError:
    return False


def read_graph(path: str | os.PathLike) -> dict:
  """A graph.json file's object (PositionViewerError naming the file if it cannot be read)."""
  try:
    with open(path, encoding="utf-8") as fh:
      obj = json.load(fh)
  except (OSError, ValueError) as e:
    raise PositionViewerError(f"{os.fspath(path)}: cannot read graph.json: {e}") from None
  if not isinstance(obj, dict):
    raise PositionViewerError(f"{os.fspath(path)}: graph.json is not a JSON object")
  return obj


def _node(name: str, pos: int, col: int, n_layers: int) -> dict:
  if name == "input":
    kind, row, layer, label = "input", 0, None, "input"
  elif name == "logits":
    kind, row, layer, label = "logits", 2 * n_layers + 1, None, "logits"
  elif name.startswith("a"):
    layer, head = (int(x) for x in name[1:].split(".h"))
    kind, row, label = "head", 2 * layer + 1, f"h{head}"
  else:
    layer = int(name[1:])
    kind, row, label = "mlp", 2 * layer + 2, "mlp"
  return {"id": f"{name}@{pos}", "type": kind, "name": f"{name}@{pos}", "row": row, "pos": col,
          "layer": layer, "feature": None, "activation": None, "influence": None, "prob": None,
          "target": False, "label": label}


def page_data(graph: Mapping[str, Any], *, tokens: Sequence[str] | None = None,
              title: str | None = None, max_drawn: int = MAX_DRAWN) -> dict:
  """What the page's script reads (`graph_viewer.page_data`'s fields, position mode).

  Args:
    graph: a position graph.json object (`format`, the model shape, `n_pos`, `edges`, `meta`).
    tokens: labels of positions 0, 1, ... (e.g. row 0's token ids; fewer than n_pos leaves the
      rest unlabelled).
    title: the page's heading (default: the meta's method and task, else "position circuit").
    max_drawn: draw at most this many edges, the strongest by |score|.
  """
  if graph.get("format") != P.FORMAT:
    raise PositionViewerError(f"graph.json is not a {P.FORMAT} file (format "
                              f"{graph.get('format')!r}): find_circuit --level=position writes one")
  try:
    shape = GraphShape(int(graph["n_layers"]), int(graph["n_heads"]),
                       bool(graph["parallel_attn_mlp"]))
    n_pos, raw = int(graph["n_pos"]), dict(graph["edges"])
  except (KeyError, TypeError, ValueError) as e:
    raise PositionViewerError(f"graph.json: missing or bad field {e}") from None
  if tokens is not None and len(tokens) > n_pos:
    raise PositionViewerError(f"tokens: {len(tokens)} labels for {n_pos} positions")
  if max_drawn < 1:
    raise PositionViewerError(f"max_drawn={max_drawn}: must be at least 1")
  lay = layout_for(shape_key(shape))
  edges = []  # (name, sender, sender position, receiver, receiver position, score)
  for name, v in raw.items():
    try:
      s, ps, r, pr = P.parse_edge_name(lay, name)
    except GraphError as e:
      raise PositionViewerError(f"graph.json: {e}") from None
    if max(ps, pr) >= n_pos or not isinstance(v, int | float) or not math.isfinite(v):
      raise PositionViewerError(f"graph.json: edge {name!r}: position outside the file's {n_pos} "
                                f"or a non-finite score {v!r}")
    edges.append((name, s, ps, r, pr, float(v)))
  drawn = sorted(range(len(edges)), key=lambda k: -abs(edges[k][5]))[:max_drawn]
  drawn = sorted(drawn)  # graph.json's order
  shown = [edges[k] for k in drawn]
  columns = sorted({p for e in shown for p in (e[2], e[4])})
  col = {p: i for i, p in enumerate(columns)}
  nodes: dict[str, dict] = {}
  s_idx, t_idx, qkv = [], [], []
  for _, s, ps, r, pr, _ in shown:
    rnode = plots.receiver_parts(lay.receiver_names[r])[0]
    for name, p in ((lay.sender_names[s], ps), (rnode, pr)):
      nodes.setdefault(f"{name}@{p}", _node(name, p, col[p], lay.n_layers))
  order = sorted(nodes, key=lambda k: (nodes[k]["row"], nodes[k]["pos"],  # heads by index
                                       int(k.split(".h")[1].split("@")[0]) if ".h" in k else 0))
  index = {k: i for i, k in enumerate(order)}
  for _, s, ps, r, pr, _ in shown:
    rnode, x = plots.receiver_parts(lay.receiver_names[r])
    s_idx.append(index[f"{lay.sender_names[s]}@{ps}"])
    t_idx.append(index[f"{rnode}@{pr}"])
    qkv.append(x or "")
  labels = [str(t) for t in tokens] if tokens is not None else []
  meta = graph.get("meta") if isinstance(graph.get("meta"), dict) else {}
  if title is None:
    title = (f"{meta['method']} on {meta['task']}, position level" if isinstance(
        meta.get("method"), str) and isinstance(meta.get("task"), str) else "position circuit")
  weights = [e[5] for e in shown]
  faith = meta.get("faithfulness")
  line = (f"{len(edges)} position edges" + (f" (the {len(shown)} strongest drawn)" if len(shown)
          < len(edges) else "") + f" over {len(columns)} of {n_pos} positions; model "
          f"{lay.n_layers} layers x {lay.n_heads} heads" + (f" · faithfulness {faith:.3f}" if
          isinstance(faith, int | float) else "") + " · columns: positions an edge touches"
          + (", labelled with their tokens" if labels else ""))
  row_names = ["input"] + [t for li in range(lay.n_layers) for t in (f"attn {li}", f"mlp {li}")]
  return {"mode": "position", "title": title, "prompt": None, "shared_ids": [],
          "ambiguous_links": 0, "prompt_tokens": [labels[p] if p < len(labels) else ""
                                                  for p in columns],
          "row_tokens": labels, "columns": columns, "scan": None, "n_layers": lay.n_layers,
          "n_rows": 2 * lay.n_layers + 2, "row_names": row_names + ["logits"],
          "node_threshold": None, "edge_threshold": None, "meta_line": line,
          "weight_label": "score", "nodes": [nodes[k] for k in order],
          "links": {"s": s_idx, "t": t_idx, "w": weights, "name": [e[0] for e in shown],
                    "qkv": qkv},
          "max_abs_weight": max((abs(w) for w in weights), default=0.0),
          "legend": {"positive": plots.POSITIVE_LABEL.split(": ")[-1],
                     "negative": plots.NEGATIVE_LABEL.split(": ")[-1],
                     "qkv": [[k or "", plots.QKV_LABELS[k]] for k in ("q", "k", "v", None)],
                     "html": _LEGEND}}


_LEGEND = (
    f"<p>An edge's <b>score</b>: {convention.DISPLAYED}: how much ablating that one position "
    "edge hurts the task metric (estimated by the gradient methods, measured by exact "
    "patching). Blue is positive, red negative; width grows as √(|score| / largest |score|)."
    "</p>"
    "<p>Rows: <b>input</b>, per layer its attention heads then its MLP, <b>logits</b>. Columns: "
    "the token positions an edge touches. An edge within a column joins a sender and a receiver "
    "at one position; an edge between columns runs from a sender at key position j to a head's "
    "k or v input as read by query position i (PEAP's crossing edges).</p>")


def render_html(graph: Mapping[str, Any], *, tokens: Sequence[str] | None = None,
                title: str | None = None, max_drawn: int = MAX_DRAWN) -> str:
  """The page as one HTML string: the attribution-graph viewer's template with its CSS,
  JavaScript and this graph's data inlined."""
  data = page_data(graph, tokens=tokens, title=title, max_drawn=max_drawn)
  text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
  text = text.replace("</", "<\\/").replace("<!--", "<\\!--")  # cannot close the script
  esc = (data["title"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
         .replace('"', "&quot;"))
  parts = {"/*__CSS__*/": _asset("graph_viewer.css"), "/*__JS__*/": _asset("graph_viewer.js"),
           "/*__DATA__*/": text, "__TITLE__": esc}
  return re.sub("|".join(re.escape(m) for m in parts), lambda m: parts[m.group(0)],
                _asset("graph_viewer.html"))


def _asset(name: str) -> str:
  with open(os.path.join(graph_viewer.ASSET_DIR, name), encoding="utf-8") as fh:
    return fh.read()


def write_html(graph: Mapping[str, Any] | str | os.PathLike, path: str | os.PathLike, *,
               tokens: Sequence[str] | None = None, title: str | None = None,
               max_drawn: int = MAX_DRAWN) -> str:
  """Write the page of `graph` (a position graph.json object or path) to `path` atomically;
  returns `path`. Everything is rendered before anything is written."""
  obj = graph if isinstance(graph, Mapping) else read_graph(graph)
  page = render_html(obj, tokens=tokens, title=title, max_drawn=max_drawn)
  try:
    files.atomic_write_text(path, page)
  except OSError as e:
    raise PositionViewerError(f"cannot write {os.fspath(path)}: {e}") from None
  return os.fspath(path)


def write_view(graph_path: str, out: str, *, title: str | None, curve: str | None,
               n: int | None, max_drawn: int) -> str:
  """`experiments.view` for a position graph.json (`page.write_page` calls it once its --out is
  checked): InputError naming the flag for the settings the page has no use for."""
  if curve:
    raise inputs.InputError("--curve: a position-level graph's page shows no curve (find_circuit "
                            "--level=position draws its faithfulness.png)")
  if n is not None:
    raise inputs.InputError("--n: a position-level graph's page draws all its edges; choose the "
                            "circuit with find_circuit's --top_n")
  try:
    page = render_html(read_graph(graph_path), title=title, max_drawn=max_drawn)
  except PositionViewerError as e:
    raise inputs.InputError(f"--graph: {e}") from None
  try:
    files.atomic_write_text(out, page)
  except OSError as e:
    raise inputs.InputError(f"--out={out}: cannot write: {e}") from None
  return out
