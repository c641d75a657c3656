"""`graph.json` in circuit-tracer's frontend schema (`create_graph_files`), which circuit-tracer's
local server and Neuronpedia open.

The file holds `metadata`, `qParams`, `nodes` and `links` of the pruned graph, with circuit-tracer's
node ids: features `"{layer}_{feature}_{pos}"`, errors `"0_{layer}_{pos}"`, tokens
`"E_{token}_{pos}"`, logits `"{n_layers + 1}_{token}_{last pos}"`. Node `influence` is the node's
cumulative influence share (`pruning.PruneResult.cumulative_scores`); nodes without a kept edge are
dropped, except tokens and logits. The directory also gets `graph-metadata.json`, the index the
server lists graphs from.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from jaxinterp.transcoders import pruning
from jaxinterp.transcoders.graph import AttributionGraph


def _cantor(x: int, y: int) -> int:
  return (x + y) * (x + y + 1) // 2 + y


def _node(node_id, feature, layer, ctx_idx, feature_type, js_id, *, token_prob=0.0,
          is_target_logit=False, clerp="", influence=None, activation=None) -> dict:
  return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx,
          "feature_type": feature_type, "token_prob": token_prob,
          "is_target_logit": is_target_logit, "run_idx": 0, "reverse_ctx_idx": 0,
          "jsNodeId": js_id, "clerp": clerp, "influence": influence, "activation": activation}


def nodes(graph: AttributionGraph, node_mask: np.ndarray, cumulative_scores: np.ndarray,
          logit_labels: list[str]) -> dict[int, dict]:
  """The frontend node of every kept node index, in index order."""
  L, n_pos, nf = graph.n_layers, graph.n_pos, graph.n_features
  out = {}
  for i in np.flatnonzero(node_mask).tolist():
    infl = float(cumulative_scores[i])
    if i < nf:
      a = int(graph.selected_features[i])
      layer, pos, feat = (int(v) for v in graph.active_features[a])
      out[i] = _node(f"{layer}_{feat}_{pos}", _cantor(layer, feat), str(layer), pos,
                     "cross layer transcoder", f"{layer}_{feat}-0", influence=infl,
                     activation=float(graph.activation_values[a]))
    elif i < graph.token_start:
      layer, pos = divmod(i - nf, n_pos)
      out[i] = _node(f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error",
                     f"{layer}_{pos}-0", influence=infl)
    elif i < graph.logit_start:
      pos = i - graph.token_start
      tok = int(graph.input_tokens[pos])
      out[i] = _node(f"E_{tok}_{pos}", pos, "E", pos, "embedding", f"E_{tok}-{pos}",
                     influence=infl)
    else:
      k = i - graph.logit_start
      tok, prob, layer = int(graph.logit_tokens[k]), float(graph.logit_probabilities[k]), str(L + 1)
      out[i] = _node(f"{layer}_{tok}_{n_pos - 1}", tok, layer, n_pos - 1, "logit",
                     f"L_{tok}-{n_pos - 1}", token_prob=prob, is_target_logit=k == 0,
                     clerp=f'Output "{logit_labels[k]}" (p={prob:.3f})')
  return out


def graph_json(graph: AttributionGraph, *, slug: str, scan: str | list[str], prompt: str,
               prompt_tokens: list[str], logit_labels: list[str], node_threshold: float = 0.8,
               edge_threshold: float = 0.98, pruned: pruning.PruneResult | None = None) -> dict:
  """The pruned graph as circuit-tracer's frontend JSON object.

  Args:
    graph: the dense graph.
    slug: the graph's name; scan: the transcoders' identifier (a list of names becomes
      `"custom-<hash>"`, as circuit-tracer, but with a stable hash where circuit-tracer's varies
      between processes).
    prompt: the decoded prompt; prompt_tokens: each input token decoded; logit_labels: each logit
      target's text.
    node_threshold, edge_threshold: `pruning.prune`'s.
    pruned: `pruning.prune(graph, node_threshold, edge_threshold)` if already computed.
  """
  res = pruning.prune(graph, node_threshold, edge_threshold) if pruned is None else pruned
  by_index = nodes(graph, res.node_mask, res.cumulative_scores, logit_labels)
  dsts, srcs = np.nonzero(res.edge_mask)
  weights = graph.adjacency[dsts, srcs].tolist()
  links = [{"source": by_index[s]["node_id"], "target": by_index[d]["node_id"], "weight": w}
           for s, d, w in zip(srcs.tolist(), dsts.tolist(), weights, strict=True)
           if s in by_index and d in by_index]
  connected = {e["source"] for e in links} | {e["target"] for e in links}
  used = [n for n in by_index.values()
          if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
  transcoder_list = []
  if isinstance(scan, list):
    transcoder_list = list(scan)
    digest = hashlib.sha256("-".join(scan).encode()).hexdigest()[:16]
    scan = f"custom-{digest}"
  metadata = {"slug": slug, "scan": scan, "transcoder_list": transcoder_list,
              "prompt_tokens": list(prompt_tokens), "prompt": prompt,
              "node_threshold": node_threshold, "schema_version": 1}
  qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
             "sg_pos": ""}
  return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_graph_files(graph: AttributionGraph, out_dir: str | os.PathLike, *, slug: str = "graph",
                      **kwargs) -> str:
  """Write `{slug}.json` (`graph_json(graph, slug=slug, **kwargs)`) and add it to
  `graph-metadata.json` in `out_dir`; return the JSON's path."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  obj = graph_json(graph, slug=slug, **kwargs)
  path = os.path.join(out_dir, f"{slug}.json")
  # Unindented: with `indent`, the json module encodes in Python (0.4 s for 27k links) instead of
  # its C encoder; the frontend parses either. One write, not one per JSON token.
  text = json.dumps(obj, ensure_ascii=False)
  with open(path, "w") as fh:
    fh.write(text)
  index_path = os.path.join(out_dir, "graph-metadata.json")
  index = {"graphs": []}
  if os.path.exists(index_path):
    with open(index_path) as fh:
      index = json.load(fh)
  index["graphs"] = [g for g in index["graphs"] if g["slug"] != slug] + [obj["metadata"]]
  with open(index_path, "w") as fh:
    json.dump(index, fh, indent=2)
  return path
