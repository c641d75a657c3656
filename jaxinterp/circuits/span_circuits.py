"""Span circuits: a circuit as a set of span-level edges (`circuits.schemas`), its files, and the
position edges each span edge covers in a row.

A span circuit is a pair of span masks (1 = in): `local` [span, sender, receiver], non-crossing
edges within a span, and `crossing` [key_span, query_span, sender, kv], crossing edges from a
sender in the key span to a head's k/v input read in the query span. In one row, a span edge covers
exactly the position edges `schemas.aggregate_row` aggregated into it: `s@A -> r@A` (r not a k/v
input) every local edge s -> r at a position p of span A, and `s@A -> h<k|v>@B` every crossing
edge from key j in A to query i in B, j <= i. A position in no span is in no span edge, so it is
always ablated. `row_masks` gives one row's position masks; the forward reads them through each
row's span owners (`owners`; `evaluation.position_circuits.circuit_metric(..., owner=...)`).

Every span edge counts, including crossing edges whose key span comes after the query span in
every row (they cover nothing and score 0): `n_edges` = spans x (valid non-k/v edges) + spans^2 x
(valid k/v edges). Ranking is `circuits.selection.ranked`'s (|score| or signed importance, ties by
index, local edges before crossing ones), so `select(n)` is a prefix of `select(n + 1)`.

Files: `to_json` writes span edges by name (`a0.h3@after_first_A->a1.h0<k>@last`) in graph.json's
sign (EAP-IG's, higher = more important), with the span names, the schema's name and the
aggregation, and a `meta` section; `to_npz` writes every score. `from_json` / `from_npz` read them
back (scores in the `loss` convention).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxinterp.circuits import convention as conv
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits import selection
from jaxinterp.circuits.layout import GraphError, GraphShape, check_count, layout_for, shape_key
from jaxinterp.circuits.schemas import SpanScores, span_edge_name

FORMAT = "jaxinterp-span-scores"
VERSION = 1


def with_convention(scores: SpanScores, convention: str) -> SpanScores:
  """The same span scores in `convention` (negated if it differs; no -0.0)."""
  if conv.check(convention) == scores.convention:
    return scores
  flip = lambda x: conv.displayed(x, conv.METRIC)  # noqa: E731 (x * -1 + 0)
  return dataclasses.replace(scores, local=flip(scores.local), crossing=flip(scores.crossing),
                             convention=convention)


def edge_masks(shape: Any, n_span: int) -> tuple[np.ndarray, np.ndarray]:
  """(Bool[ndarray, "span sender receiver"], Bool[ndarray, "key_span query_span sender kv"]):
  every span edge of a graph of `shape` over `n_span` spans."""
  lay, kv = layout_for(shape_key(shape)), cpos.kv_receivers(shape)
  local = np.broadcast_to(lay.valid, (n_span,) + lay.valid.shape).copy()
  local[:, :, kv] = False
  crossing = np.broadcast_to(lay.valid[:, kv], (n_span, n_span, lay.n_senders, kv.size)).copy()
  return local, crossing


def n_edges(scores: SpanScores) -> int:
  """How many span edges there are (`edge_masks`), scored zero or not."""
  return int(sum(np.count_nonzero(m) for m in edge_masks(scores.shape, len(scores.names))))


def _flat(scores: SpanScores) -> np.ndarray:
  v_local, v_cross = edge_masks(scores.shape, len(scores.names))
  return np.concatenate([np.where(v_local, scores.local, np.nan).ravel(),
                         np.where(v_cross, scores.crossing, np.nan).ravel()])


def select(scores: SpanScores, n: int, absolute: bool = True
           ) -> list[tuple[int, int, int, int, float]]:
  """The n best span edges as (sender, sender span, receiver, receiver span, score), best first
  (ranked as the module docstring says). GraphError if n is not in [0, n_edges]."""
  n = check_count(n, n_edges(scores), "top_n: n")
  order = selection.ranked(_flat(scores), absolute=absolute,
                           score_convention=scores.convention)[:n]
  kv = cpos.kv_receivers(scores.shape)
  out = []
  for k in order.tolist():
    if k < scores.local.size:
      a, s, r = np.unravel_index(k, scores.local.shape)
      out.append((int(s), int(a), int(r), int(a), float(scores.local[a, s, r])))
    else:
      a, b, s, c = np.unravel_index(k - scores.local.size, scores.crossing.shape)
      out.append((int(s), int(a), int(kv[c]), int(b), float(scores.crossing[a, b, s, c])))
  return out


def selection_ranks(scores: SpanScores, absolute: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(Int32 [span, sender, receiver], Int32 [key_span, query_span, sender, kv]): each span edge's
  rank in `select`'s order (0 = best), `n_edges` where there is no edge, so `rank < n` is the
  mask of `select(n, absolute)`."""
  flat = _flat(scores)
  order = selection.ranked(flat, absolute=absolute, score_convention=scores.convention)
  rank = np.full(flat.size, order.size, np.int32)
  rank[order] = np.arange(order.size, dtype=np.int32)
  n = scores.local.size
  return rank[:n].reshape(scores.local.shape), rank[n:].reshape(scores.crossing.shape)


def circuit_masks(shape: Any, n_span: int, edges: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
  """A span circuit as Float32 span masks (`local`, `crossing`; 1 = in) from `select`'s rows
  (sender, sender span, receiver, receiver span[, score]); GraphError for a row that is not a
  span edge of a graph of `n_span` spans."""
  local, crossing = (np.zeros(m.shape, np.float32) for m in edge_masks(shape, n_span))
  lay = layout_for(shape_key(shape))
  kv = {int(r): c for c, r in enumerate(cpos.kv_receivers(shape))}
  for row in edges:
    s, a, r, b = (int(x) for x in row[:4])
    if not (0 <= a < n_span and 0 <= b < n_span and lay.valid[s, r]):
      raise GraphError(f"{lay.edge_name(s, r)} from span {a} to span {b} is not a span edge of "
                       f"a {n_span}-span graph")
    if r in kv:
      crossing[a, b, s, kv[r]] = 1.0
    elif a != b:
      raise GraphError(f"{lay.edge_name(s, r)} from span {a} to span {b}: non-crossing span "
                       "edges stay within a span")
    else:
      local[a, s, r] = 1.0
  return local, crossing


def owners(spans: np.ndarray, n_pos: int) -> np.ndarray:
  """Int32 [row, pos]: the span covering each position of each row (-1: none), from the rows'
  spans Int [row, span, 2] (`schemas.dataset_spans`)."""
  spans = np.asarray(spans)
  out = np.full((spans.shape[0], n_pos), -1, np.int32)
  for row, row_spans in enumerate(spans):
    for k, (a, b) in enumerate(row_spans):
      out[row, a:b] = k
  return out


def row_masks(local: np.ndarray, crossing: np.ndarray, spans: np.ndarray, n_pos: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """One row's position circuit (Float32 `local` [pos, sender, receiver], `crossing` [pair,
  sender, kv], `circuits.positions`' masks) holding exactly the position edges that the span
  masks' edges cover in the row of spans Int [span, 2] (`schemas.aggregate_row`'s grouping)."""
  own = owners(np.asarray(spans)[None], n_pos)[0]
  qi, kj = cpos.pairs(n_pos)
  oq, ok = own[qi], own[kj]
  pos_local = np.where((own >= 0)[:, None, None], np.asarray(local)[own], 0.0)
  pos_cross = np.where(((oq >= 0) & (ok >= 0))[:, None, None], np.asarray(crossing)[ok, oq], 0.0)
  return pos_local.astype(np.float32), pos_cross.astype(np.float32)


def _header(scores: SpanScores) -> dict[str, Any]:
  lay = scores.layout
  return {"format": FORMAT, "version": VERSION, "n_layers": lay.n_layers, "n_heads": lay.n_heads,
          "parallel_attn_mlp": lay.parallel, "spans": list(scores.names),
          "schema": scores.schema, "aggregation": scores.aggregation, "n_rows": scores.n_rows,
          conv.KEY: conv.LOSS}


def _empty(d: dict[str, Any], where: str) -> SpanScores:
  if d.get("format") != FORMAT:
    raise GraphError(f"{where} is not a {FORMAT} file (format {d.get('format')!r})")
  try:
    shape = GraphShape(int(d["n_layers"]), int(d["n_heads"]), bool(d["parallel_attn_mlp"]))
    names = tuple(str(n) for n in d["spans"])
    how, n_rows, schema = str(d["aggregation"]), int(d["n_rows"]), d.get("schema")
  except (KeyError, TypeError, ValueError) as e:
    raise GraphError(f"{where}: missing or bad field {e}") from None
  local, crossing = (np.zeros(m.shape, np.float32) for m in edge_masks(shape, len(names)))
  return SpanScores(shape, names, local, crossing, how, n_rows, conv.LOSS, schema)


def to_json(scores: SpanScores, path: str | os.PathLike, *,
            edges: Sequence[tuple] | None = None, meta: dict[str, Any] | None = None) -> None:
  """Write the non-zero span scores by name (graph.json's sign: higher = more important); with
  `edges` (`select`'s rows: a circuit) only those, in their order. `meta` (the run's provenance)
  is written as a "meta" section with the schema's name and the aggregation added."""
  s = with_convention(scores, conv.LOSS)
  lay, names = s.layout, s.names
  kv = {int(r): c for c, r in enumerate(cpos.kv_receivers(s.shape))}
  rows = ([(a, ka, b, kb, float(s.crossing[ka, kb, a, kv[b]] if b in kv else s.local[ka, a, b]))
           for a, ka, b, kb, *_ in edges] if edges is not None
          else [(e[0], e[1], e[2], e[3], e[4]) for e in s.entries()])
  named = {span_edge_name(lay, names, a, ka, b, kb): v for a, ka, b, kb, v in rows}
  info = {"schema": s.schema, "span_aggregation": s.aggregation}
  with open(path, "w") as f:
    json.dump({**_header(s), "edges": named, "meta": {**(meta or {}), **info}}, f, indent=1)


def parse_edge_name(layout, names: Sequence[str], name: str) -> tuple[int, int, int, int]:
  """(sender, sender span, receiver, receiver span) of a span edge name; GraphError naming it
  otherwise."""
  parts = name.split("->") if isinstance(name, str) else []
  ends = [p.rsplit("@", 1) for p in parts]
  idx = (len(parts) == 2 and all(len(e) == 2 for e in ends)
         and layout.parse_edge(f"{ends[0][0]}->{ends[1][0]}"))
  if not idx or ends[0][1] not in names or ends[1][1] not in names:
    raise GraphError(f"{name!r} is not a span edge of this model ({layout.describe()}) and spans "
                     f"{tuple(names)}, e.g. 'a0.h3@{names[0]}->a1.h0<k>@{names[-1]}'")
  out = (idx[0], list(names).index(ends[0][1]), idx[1], list(names).index(ends[1][1]))
  span_edge_name(layout, names, *out)  # checks that it is a span edge
  return out


def from_json(path: str | os.PathLike) -> SpanScores:
  """Read `to_json`'s file (scores in the `loss` convention; edges not in it are 0); GraphError
  naming the file and the first bad edge name."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise GraphError(f"{path}: cannot read span scores ({e})") from None
  out = _empty(d if isinstance(d, dict) else {}, str(path))
  kv = {int(r): c for c, r in enumerate(cpos.kv_receivers(out.shape))}
  for name, v in dict(d.get("edges", {})).items():
    s, a, r, b = parse_edge_name(out.layout, out.names, name)
    if r in kv:
      out.crossing[a, b, s, kv[r]] = v
    else:
      out.local[a, s, r] = v
  return out


def to_npz(scores: SpanScores, path: str | os.PathLike) -> None:
  """Write every span score (graph.json's sign) as .npz: `local`, `crossing` and a JSON `meta`."""
  s = with_convention(scores, conv.LOSS)
  cpos.write_npz(path, s.local, s.crossing, _header(s))


def from_npz(path: str | os.PathLike) -> SpanScores:
  """Read `to_npz`'s file (scores in the `loss` convention); GraphError for another file."""
  return cpos.read_npz(path, "span-scores", _empty)
