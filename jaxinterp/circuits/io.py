"""Reading and writing graphs: EAP-IG's `graph.json` (old and new node formats) and our `.npz`.

The JSON is EAP-IG's: `cfg`, `nodes` and every valid edge with its `score` and `in_graph`, plus an
optional `meta` section that EAP-IG readers ignore. Nodes are read in both of EAP-IG's formats:
`{name: {"in_graph": bool, "score"?: float, "neurons"?: [bool] * d_model,
"neurons_scores"?: [float] * d_model}}` (2024 on; the neuron lists are neuron-level circuits and
scores, `Graph.neurons_in_graph` / `neuron_scores`, NaN written as null) and `{name: bool}`
(older). JSON scores are written in EAP-IG's and MIB's sign (`convention.LOSS`: higher = more
important; a `metric`-convention graph's scores are negated and `meta.score_convention` says
`loss`), so their `apply_topn(absolute=False)` selects what our signed selection does; files are
read in the convention their meta records (`convention.of`). The `.npz` holds the dense matrices
as they are in memory, with the convention in its meta. Files are written atomically; files are read
defensively (a hostile or malformed file raises `GraphError` naming what is wrong, and its shape
fields cannot make us allocate more than `_MAX_ENTRIES_FROM_FILE` matrix entries).

`Graph.to_dict`, `to_json`, `to_npz`, `from_dict`, `from_json` and `from_npz` delegate here. This
module does not import `circuits.graph`: writers take a graph, readers take the class to build
(`from_json(Graph, path)`), as the classmethods pass it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxinterp.circuits import convention, layout
from jaxinterp.circuits.layout import GraphError, GraphShape
from jaxinterp.runtime.files import atomic_write

if TYPE_CHECKING:
  from jaxinterp.circuits.graph import Graph

# "Float[ndarray, 'sender receiver']" style shape comments below refer to numpy arrays.

# A graph built from a JSON/npz file's own shape fields may not exceed this many matrix entries
# (Llama-3-70B has ~8e7); it keeps a hostile file from allocating unbounded memory.
_MAX_ENTRIES_FROM_FILE = 1 << 28
_F32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------



def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
  """`files.atomic_write`, reporting failures as `GraphError`."""
  try:
    atomic_write(path, data)
  except OSError as e:
    raise GraphError(f"cannot write {os.fspath(path)}: {e}") from e



def _as_score(x: Any) -> float | None:
  """A JSON score as a float; None if it is not a real number (bools are not numbers here)."""
  if isinstance(x, bool) or not isinstance(x, numbers.Real):
    return None
  try:
    return float(x)
  except (OverflowError, ValueError):
    return float("inf")



def _as_flag(x: Any) -> bool | None:
  if isinstance(x, bool):
    return x
  if isinstance(x, int) and x in (0, 1):
    return bool(x)
  return None



def _shape_from_json_cfg(jcfg: dict) -> GraphShape:
  vals = {}
  for name in ("n_layers", "n_heads"):
    v = jcfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise GraphError(f"graph JSON cfg {name} must be a positive integer, got {v!r}")
    vals[name] = v
  parallel = jcfg.get("parallel_attn_mlp", False)
  if not isinstance(parallel, bool):
    raise GraphError(f"graph JSON cfg parallel_attn_mlp must be a bool, got {parallel!r}")
  d_model = jcfg.get("d_model")
  if d_model is not None and (isinstance(d_model, bool) or not isinstance(d_model, int)):
    d_model = None
  shape = GraphShape(vals["n_layers"], vals["n_heads"], parallel, d_model)
  _check_file_shape(shape)
  return shape



def _check_file_shape(shape: GraphShape) -> None:
  L, H = shape.n_layers, shape.n_heads
  if (1 + L * (H + 1)) * (L * (3 * H + 1) + 1) > _MAX_ENTRIES_FROM_FILE:
    raise GraphError(f"graph file claims n_layers={L}, n_heads={H}: too large; pass the model "
                     f"config")


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------



def to_dict(graph: Graph, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The EAP-IG JSON structure, every valid edge with its score, plus `meta` if any.

  `meta` is merged over `graph.meta`; the "meta" section is written only when non-empty. Scores
  (edges and nodes) are in the `loss` convention: negated if the graph's is `metric`, and then
  `meta.score_convention` is "loss".
  """
  L = graph.layout
  merged = {**graph.meta, **(meta or {})}
  sign = convention.importance_sign(convention.of(merged))
  if sign < 0 or convention.KEY in merged:
    merged[convention.KEY] = convention.LOSS
  cfg = {"n_layers": L.n_layers, "n_heads": L.n_heads, "parallel_attn_mlp": L.parallel}
  d_model = getattr(graph.cfg, "d_model", None)
  if d_model is not None:
    cfg["d_model"] = int(d_model)
  nodes: dict[str, Any] = {}
  for i, name in enumerate(L.sender_names):
    entry: dict[str, Any] = {"in_graph": bool(graph.nodes_in_graph[i])}
    if graph.node_attribution is not None and not math.isnan(graph.node_attribution[i]):
      # Unscored (NaN) nodes get no "score" key: EAP-IG's reader keeps them unscored that way.
      entry["score"] = float(sign * graph.node_attribution[i])
    if graph.neurons_in_graph is not None:
      entry["neurons"] = graph.neurons_in_graph[i].tolist()
    if graph.neuron_scores is not None:
      signed = graph.neuron_scores[i] * np.float32(sign) + np.float32(0)
      entry["neurons_scores"] = [None if math.isnan(v) else v for v in signed.tolist()]
    nodes[name] = entry
  nodes["logits"] = {"in_graph": True}
  ss, rs = L.eap_order
  sn, rn = L.sender_names, L.receiver_names
  scores = (graph.scores[ss, rs] * np.float32(sign) + np.float32(0)).tolist()  # + 0: no -0.0
  flags = graph.in_graph[ss, rs].tolist()
  edges = {f"{sn[s]}->{rn[r]}": {"score": sc, "in_graph": f}
           for s, r, sc, f in zip(ss.tolist(), rs.tolist(), scores, flags, strict=True)}
  d: dict[str, Any] = {"cfg": cfg, "nodes": nodes, "edges": edges}
  if merged:
    d["meta"] = merged
  return d


def to_json(graph: Graph, path: str | os.PathLike,
            meta: Mapping[str, Any] | None = None) -> None:
  """Write EAP-IG `graph.json` atomically (temp file + rename). `meta` must be JSON-serialisable."""
  if meta is not None and not isinstance(meta, Mapping):
    raise GraphError(f"meta must be a dict, got {type(meta).__name__}")
  try:
    text = json.dumps(to_dict(graph, meta), allow_nan=False)
  except (TypeError, ValueError) as e:
    raise GraphError(f"cannot serialise graph to JSON (is meta JSON-serialisable?): {e}") from e
  _atomic_write(path, text.encode("utf-8"))


def from_json(cls: type[Graph], path: str | os.PathLike, cfg: Any = None,
              require_all_edges: bool = False) -> Graph:
  """Read an EAP-IG graph JSON (ours or EAP-IG's, old or new format) for the model `cfg`, as a
  `cls`.

  If `cfg` is None the graph's shape comes from the file's "cfg" section. Raises GraphError for
  unreadable or malformed files, files for a different model (the unknown edges are named), and NaN
  or infinite edge scores. Edges absent from the file get score 0 and are out of the circuit, as in
  EAP-IG, unless `require_all_edges`.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise GraphError(f"cannot read graph file {path}: {e}") from e
  try:
    d = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise GraphError(f"{path} is not UTF-8 text: {e}") from e
  except json.JSONDecodeError as e:
    raise GraphError(f"{path} is not valid JSON: {e}") from e
  except RecursionError as e:
    raise GraphError(f"{path} is nested too deeply to be a graph JSON") from e
  try:
    return from_dict(cls, d, cfg, require_all_edges=require_all_edges)
  except GraphError as e:
    raise GraphError(f"{path}: {e}") from None


def from_dict(cls: type[Graph], d: Any, cfg: Any = None, require_all_edges: bool = False) -> Graph:
  """Build a `cls` (a `Graph`) from a parsed EAP-IG JSON structure; see `from_json`."""
  try:
    return _from_dict(cls, d, cfg, require_all_edges)
  except GraphError:
    raise
  except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError,
          RecursionError) as e:  # a safety net: `_from_dict`'s checks should catch everything first
    raise GraphError(f"malformed graph JSON: {type(e).__name__}: {e}") from e


def _from_dict(cls: type[Graph], d: Any, cfg: Any, require_all_edges: bool) -> Graph:
  if not isinstance(d, dict):
    raise GraphError(f"a graph JSON must be an object, got {type(d).__name__}")
  missing = [k for k in ("cfg", "nodes", "edges") if k not in d]
  if missing:
    raise GraphError(f"graph JSON lacks the key(s) {missing}")
  jcfg, jnodes, jedges = d["cfg"], d["nodes"], d["edges"]
  for key, v in (("cfg", jcfg), ("nodes", jnodes), ("edges", jedges)):
    if not isinstance(v, dict):
      raise GraphError(f"graph JSON {key!r} must be an object, got {type(v).__name__}")

  problems = []
  if cfg is None:
    shape = _shape_from_json_cfg(jcfg)
    cfg = shape
  else:
    key = layout.shape_key(cfg)
    for name, want in (("n_layers", key[0]), ("n_heads", key[1]), ("parallel_attn_mlp", key[2]),
                       ("d_model", getattr(cfg, "d_model", None))):
      if name not in jcfg or want is None:
        continue
      got = jcfg[name]
      if got != want or isinstance(got, bool) != isinstance(want, bool):
        problems.append(f"{name}={jcfg[name]!r} but the model has {name}={want!r}")
  g = cls(cfg)
  L = g.layout

  scores = np.zeros((L.n_senders, L.n_receivers), np.float32)
  in_graph = np.zeros_like(L.valid)
  seen = np.zeros_like(L.valid)
  unknown, nonfinite, malformed = [], [], []
  for name, info in jedges.items():
    idx = L.parse_edge(name)
    if idx is None:
      unknown.append(name)
      continue
    if not isinstance(info, dict):
      malformed.append(name)
      continue
    score = _as_score(info.get("score", 0.0))  # MIB's binary circuits have no scores
    flag = _as_flag(info.get("in_graph", False))
    if score is None or flag is None:
      malformed.append(name)
      continue
    if not math.isfinite(score) or abs(score) > _F32_MAX:
      nonfinite.append(name)
      continue
    scores[idx] = score
    in_graph[idx] = flag
    seen[idx] = True
  if unknown:
    problems.append(f"{len(unknown)} edge name(s) are not edges of this model: "
                    f"{layout.list_some(unknown)}")
  if problems:
    raise GraphError(f"graph JSON does not match the model ({L.describe()}): "
                     + "; ".join(problems))
  if nonfinite:
    raise GraphError(f"{len(nonfinite)} edge score(s) are NaN or infinite: "
                     f"{layout.list_some(nonfinite)}")
  if malformed:
    raise GraphError(f"{len(malformed)} edge(s) lack a numeric 'score' or a boolean 'in_graph': "
                     f"{layout.list_some(malformed)}")
  if require_all_edges and not seen[L.valid].all():
    absent = [g.edge_name(int(s), int(r))
              for s, r in zip(*np.nonzero(L.valid & ~seen), strict=True)]
    raise GraphError(f"{len(absent)} edge(s) of the model are missing: {layout.list_some(absent)}")

  nodes = np.zeros(L.n_senders, bool)
  nodes_seen = np.zeros(L.n_senders, bool)
  attribution = np.full(L.n_senders, np.nan, np.float32)
  any_node_score = False
  neuron_rows: dict[int, tuple] = {}
  bad_nodes, bad_entries = [], []
  for name, info in jnodes.items():
    if name == "logits":
      continue
    i = L.sender_index.get(name) if isinstance(name, str) else None
    if i is None:
      bad_nodes.append(name)
      continue
    if isinstance(info, dict):  # EAP-IG >= 2024: {"in_graph": bool, "score"?, "neurons"?, ...}
      flag = _as_flag(info.get("in_graph", False))
      if "score" in info and info["score"] is not None:
        v = _as_score(info["score"])
        if v is None or math.isinf(v):
          bad_entries.append(name)
          continue
        attribution[i] = v
        any_node_score = True
      rows = _neuron_rows(info)
      if rows is None:
        bad_entries.append(name)
        continue
      neuron_rows[i] = rows
    else:  # older EAP-IG: {name: bool}
      flag = _as_flag(info)
    if flag is None:
      bad_entries.append(name)
      continue
    nodes[i] = flag
    nodes_seen[i] = True
  if bad_nodes:
    raise GraphError(f"graph JSON does not match the model ({L.describe()}): {len(bad_nodes)} node "
                     f"name(s) are not nodes of this model: {layout.list_some(bad_nodes)}")
  if bad_entries:
    raise GraphError(f"{len(bad_entries)} node entr(ies) are malformed: "
                     f"{layout.list_some(bad_entries)}")
  derived = L.nodes_from_edges(in_graph)
  nodes = np.where(nodes_seen, nodes, derived)
  meta = d.get("meta")
  masks, neuron_scores = _neuron_arrays(neuron_rows, L.n_senders, getattr(cfg, "d_model", None))
  return cls(cfg, scores, in_graph, nodes, attribution if any_node_score else None,
             meta if isinstance(meta, dict) else None, neuron_scores, masks)


_MAX_NEURONS = 1 << 16  # per node: a file cannot make us allocate more


def _neuron_rows(info: dict) -> tuple | None:
  """A node entry's (`neurons` flags, `neurons_scores`) as arrays (either None if absent), or None
  if they are malformed (not lists, wrong types, infinite scores, different lengths)."""
  flags, values = info.get("neurons"), info.get("neurons_scores")
  out = []
  for x, conv in ((flags, _as_flag), (values, lambda v: math.nan if v is None else _as_score(v))):
    if x is None:
      out.append(None)
      continue
    if not isinstance(x, list) or len(x) > _MAX_NEURONS:
      return None
    row = [conv(v) for v in x]
    if any(v is None for v in row) or any(isinstance(v, float) and math.isinf(v) for v in row):
      return None
    out.append(np.asarray(row, bool if conv is _as_flag else np.float32))
  if out[0] is not None and out[1] is not None and out[0].size != out[1].size:
    return None
  return tuple(out)


def _neuron_arrays(rows: dict, n_senders: int, d_model: int | None):
  """[n_senders, d_model] neuron masks and scores from the nodes' rows (EAP-IG: nodes without a
  `neurons` list are out of a neuron circuit; unscored neurons are NaN), or None each if absent."""
  widths = {r.size for pair in rows.values() for r in pair if r is not None}
  if not widths:
    return None, None
  if len(widths) > 1 or (d_model is not None and widths != {d_model}):
    raise GraphError(f"nodes' neuron lists have length(s) {sorted(widths)}; expected one length"
                     + (f", d_model={d_model}" if d_model is not None else ""))
  width = widths.pop()
  out = []
  for k, fill, dtype in ((0, False, bool), (1, np.nan, np.float32)):
    if all(pair[k] is None for pair in rows.values()):
      out.append(None)
      continue
    a = np.full((n_senders, width), fill, dtype)
    for i, pair in rows.items():
      if pair[k] is not None:
        a[i] = pair[k]
    out.append(a)
  return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------



def to_npz(graph: Graph, path: str | os.PathLike,
           meta: Mapping[str, Any] | None = None) -> None:
  """Write the matrices (scores, in_graph, nodes_in_graph, valid, ...) as an `.npz`, atomically."""
  L = graph.layout
  merged = {**graph.meta, **(meta or {})}
  if convention.of(merged) == convention.METRIC:  # explicit, as the npz keeps in-memory scores
    merged[convention.KEY] = convention.METRIC
  try:
    meta_json = json.dumps(merged, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise GraphError(f"meta is not JSON-serialisable: {e}") from e
  arrays = {
      "scores": graph.scores, "in_graph": graph.in_graph, "nodes_in_graph": graph.nodes_in_graph,
      "valid": np.asarray(L.valid),
      "shape": np.array([L.n_layers, L.n_heads, int(L.parallel)], np.int64),
      "meta_json": np.array(meta_json),
  }
  if graph.node_attribution is not None:
    arrays["node_attribution"] = graph.node_attribution
  for name in ("neuron_scores", "neurons_in_graph"):
    if getattr(graph, name, None) is not None:
      arrays[name] = getattr(graph, name)
  buf = BytesIO()
  np.savez(buf, **arrays)
  _atomic_write(path, buf.getvalue())


def from_npz(cls: type[Graph], path: str | os.PathLike, cfg: Any = None) -> Graph:
  """Read a graph written by `to_npz` as a `cls`; `cfg` (optional) must match the stored shape."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:  # np.load raises OSError, ValueError, BadZipFile, EOFError, ...
    raise GraphError(f"cannot read graph npz {path}: {type(e).__name__}: {e}") from e
  need = ("scores", "in_graph", "nodes_in_graph", "shape")
  missing = [k for k in need if k not in arrays]
  if missing:
    raise GraphError(f"{path} lacks the array(s) {missing}")
  shape = arrays["shape"]
  if shape.shape != (3,) or not np.issubdtype(shape.dtype, np.integer):
    raise GraphError(f"{path}: malformed 'shape' array")
  stored = (int(shape[0]), int(shape[1]), bool(shape[2]))
  if cfg is None:
    cfg = GraphShape(*stored)
    _check_file_shape(cfg)
  elif layout.shape_key(cfg) != stored:
    raise GraphError(f"{path} holds a graph with n_layers={stored[0]}, n_heads={stored[1]}, "
                     f"parallel_attn_mlp={stored[2]}; the model has {layout.shape_key(cfg)}")
  meta = None
  if "meta_json" in arrays:
    try:
      meta = json.loads(str(arrays["meta_json"]))
    except (json.JSONDecodeError, RecursionError):
      meta = None
  try:
    g = cls(cfg, arrays["scores"], arrays["in_graph"], arrays["nodes_in_graph"],
            arrays.get("node_attribution"), meta if isinstance(meta, dict) else None,
            arrays.get("neuron_scores"), arrays.get("neurons_in_graph"))
  except GraphError as e:
    raise GraphError(f"{path}: {e}") from None
  if "valid" in arrays and not np.array_equal(arrays["valid"], g.valid):
    raise GraphError(f"{path}: its valid-edge mask differs from this model's graph layout")
  return g
