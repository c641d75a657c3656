"""The attribution-graph viewer: one self-contained, offline HTML page per pruned graph.

    graph_viewer.write_html("runs/graph/graph.json", "runs/graph/graph.html")

Reads a pruned attribution graph in circuit-tracer's frontend schema (`graph.json`, as
`jaxinterp.transcoders.frontend` and circuit-tracer's `create_graph_files` write it) and draws it in
SVG: token embeddings at the bottom, one row per layer holding, in each token position's column, the
active features (circles, most influential first) and the layer's error node (a square), logit
targets at the top. Links are coloured by sign (blue positive, red negative) with width growing as
sqrt(|weight| / max |weight|). Hovering a node shows its name, activation and influence; hovering a
link its weight; clicking a node lists its inputs and outputs. A legend says what the weights mean.

circuit-tracer's node ids can repeat (a layer-0 feature `0_{f}_{p}` and the layer-f error node
`0_{f}_{p}`); a link naming a repeated id is drawn to the node its direction allows (sources sit
below targets), and the page says how many links stayed ambiguous.

The page is plain JavaScript and SVG (`jaxinterp/viz/assets/graph_viewer.*`), inlined with the data
into one file: no library, no CDN, no network request. Bad input raises `GraphViewerError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from jaxinterp.runtime import files

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
NODE_TYPES = {"cross layer transcoder": "feature", "mlp reconstruction error": "error",
              "embedding": "embedding", "logit": "logit"}
"""circuit-tracer's `feature_type`s and the viewer's names for them."""


class GraphViewerError(ValueError):
  """A graph.json the viewer cannot draw, or a page it cannot write."""


def _num(x: Any) -> float | None:
  return None if x is None or not math.isfinite(float(x)) else float(x)


def _node(n: Mapping[str, Any], n_layers: int) -> dict:
  kind = NODE_TYPES.get(n.get("feature_type"))
  if kind is None:
    raise GraphViewerError(f"node {n.get('node_id')!r}: unknown feature_type "
                           f"{n.get('feature_type')!r}")
  pos, feature = int(n["ctx_idx"]), n.get("feature")
  layer = None if kind in ("embedding", "logit") else int(n["layer"])
  if kind == "feature":
    feature = int(n["node_id"].split("_")[1])  # "{layer}_{feature}_{pos}"; `feature` is a Cantor
    name = f"L{layer} #{feature} @{pos}"       # pairing of (layer, feature)
  elif kind == "error":
    feature, name = None, f"error L{layer} @{pos}"
  elif kind == "embedding":
    feature, name = None, f"token @{pos}"
  else:
    name = n.get("clerp") or f"logit {feature}"
  row = {"embedding": 0, "logit": n_layers + 1}.get(kind, (layer or 0) + 1)
  return {"id": n["node_id"], "type": kind, "name": name, "row": row, "pos": pos,
          "layer": layer, "feature": None if feature is None else int(feature),
          "activation": _num(n.get("activation")), "influence": _num(n.get("influence")),
          "prob": _num(n.get("token_prob")) if kind == "logit" else None,
          "target": bool(n.get("is_target_logit")), "label": ""}


def page_data(graph: Mapping[str, Any], title: str | None = None) -> dict:
  """What the page's script reads: the nodes with their rows (0: tokens, 1 + layer, top: logits)
  and positions, the links as index arrays, and the prompt.

  Args:
    graph: a graph.json object (`metadata`, `nodes`, `links`).
  """
  try:
    meta, raw_nodes, raw_links = graph["metadata"], graph["nodes"], graph["links"]
    tokens = [str(t) for t in meta["prompt_tokens"]]
    logit_layers = [int(n["layer"]) for n in raw_nodes if n.get("feature_type") == "logit"]
    inner = [int(n["layer"]) for n in raw_nodes if n.get("feature_type") in
             ("cross layer transcoder", "mlp reconstruction error")]
    n_layers = max(logit_layers) - 1 if logit_layers else max(inner, default=-1) + 1
    nodes = [_node(n, n_layers) for n in raw_nodes]
    index: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
      index.setdefault(n["id"], []).append(i)
    s, t, ambiguous = [], [], 0
    for e in raw_links:
      si, ti = index[e["source"]], index[e["target"]]
      pairs = [(a, b) for a in si for b in ti if nodes[a]["row"] < nodes[b]["row"]] or [
          (si[0], ti[0])]
      ambiguous += len(pairs) > 1
      s.append(pairs[0][0])
      t.append(pairs[0][1])
    w = [float(e["weight"]) for e in raw_links]
  except GraphViewerError:
    raise
  except KeyError as e:
    raise GraphViewerError(f"graph.json: missing {e} (a link to an absent node, or not "
                           "circuit-tracer's frontend schema)") from None
  except (TypeError, ValueError, AttributeError) as e:
    raise GraphViewerError(f"graph.json is not circuit-tracer's frontend schema: {e}") from None
  for n in nodes:
    if not 0 <= n["pos"] < len(tokens) or not 0 <= n["row"] <= n_layers + 1:
      raise GraphViewerError(f"node {n['id']!r}: position {n['pos']} or layer outside the "
                             f"prompt's {len(tokens)} tokens and {n_layers} layers")
    if n["type"] == "embedding":
      n["label"] = tokens[n["pos"]]
    elif n["type"] == "logit":
      n["label"] = re.sub(r'^Output "(.*)" \(p=.*\)$', r"\1", n["name"])
  finite = [abs(x) for x in w if math.isfinite(x)]
  if len(finite) != len(w):
    raise GraphViewerError("graph.json has a link with a non-finite weight")
  shared = sorted(k for k, v in index.items() if len(v) > 1)
  return {"title": title or meta.get("slug") or "attribution graph", "prompt": meta.get("prompt"),
          "shared_ids": shared, "ambiguous_links": ambiguous,
          "prompt_tokens": tokens, "scan": meta.get("scan"), "n_layers": n_layers,
          "node_threshold": meta.get("node_threshold"),
          "edge_threshold": meta.get("edge_threshold"), "nodes": nodes,
          "links": {"s": s, "t": t, "w": w}, "max_abs_weight": max(finite, default=0.0)}


def _asset(name: str) -> str:
  with open(os.path.join(ASSET_DIR, name), encoding="utf-8") as fh:
    return fh.read()


def _escape(text: str) -> str:
  return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
          .replace('"', "&quot;"))


def render_html(graph: Mapping[str, Any], title: str | None = None) -> str:
  """The page as one HTML string: the template with its CSS, JavaScript and data inlined."""
  data = page_data(graph, title)
  text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
  text = text.replace("</", "<\\/").replace("<!--", "<\\!--")  # cannot close the script
  parts = {"/*__CSS__*/": _asset("graph_viewer.css"), "/*__JS__*/": _asset("graph_viewer.js"),
           "/*__DATA__*/": text, "__TITLE__": _escape(data["title"])}
  return re.sub("|".join(re.escape(m) for m in parts), lambda m: parts[m.group(0)],
                _asset("graph_viewer.html"))


def read_graph(path: str | os.PathLike) -> dict:
  """A graph.json file's object (GraphViewerError naming the file if it cannot be read)."""
  try:
    with open(path, encoding="utf-8") as fh:
      return json.load(fh)
  except (OSError, ValueError) as e:
    raise GraphViewerError(f"{os.fspath(path)}: cannot read graph.json: {e}") from None


def write_html(graph: Mapping[str, Any] | str | os.PathLike, path: str | os.PathLike,
               title: str | None = None) -> str:
  """Write the page of `graph` (a graph.json object or path) to `path` atomically; returns `path`.

  Everything is rendered before anything is written, so bad input leaves no file behind.
  """
  obj = graph if isinstance(graph, Mapping) else read_graph(graph)
  page = render_html(obj, title)
  try:
    files.atomic_write_text(path, page)
  except OSError as e:
    raise GraphViewerError(f"cannot write {os.fspath(path)}: {e}") from None
  return os.fspath(path)
