"""Position-level edges: every edge of the EAP-IG graph at each token position, and PEAP's crossing
edges, with their names and files.

Non-crossing edges join a sender and a receiver at the same position p: `input`, a head or an MLP
at p into a head's q input, an MLP input or the logits at p. Crossing edges (Haklay et al. 2025,
PEAP) join a sender at key position j to a head's k or v input *as read by query position i*
(j <= i): ablating one changes only query i's attention to key j. Names extend EAP-IG's with the
sender's and the receiver's position: `a0.h3@5->m1@5`, `a0.h3@5->a1.h0<k>@9` (sender at 5, read by
query 9).

Scores live in a `PositionScores`: `local` [pos, sender, receiver] (zero in the k and v columns)
and `crossing` [n_pairs, sender, kv], the (i, j) pairs packed lower-triangular (pair `i*(i+1)/2
+ j`, so n_pairs = n_pos (n_pos + 1) / 2, never the n_pos^2 square) and only the k/v receivers
(`kv_receivers`). Summed over positions (and query positions) they are the edge-level matrix
(`edge_scores`). Files (`.npz`, `.json`) hold the scores in graph.json's sign (the `loss`
convention, `circuits.convention`); the JSON lists only the non-zero entries, by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np

from jaxinterp.circuits import convention as conv
from jaxinterp.circuits import selection
from jaxinterp.circuits.layout import (
    GraphError,
    GraphShape,
    Layout,
    check_count,
    layout_for,
    shape_key,
)
from jaxinterp.models import edges as E

FORMAT = "jaxinterp-position-scores"
VERSION = 1
_NAME = re.compile(r"^(.+)@(\d+)->(.+)@(\d+)$")


def kv_receivers(shape: Any) -> np.ndarray:
  """Int [2 * n_layers * n_heads]: the k then v receiver of every head, layer by layer (the last
  axis of `PositionScores.crossing`)."""
  return np.array([E.head_receiver(shape, li, h, x) for li in range(shape.n_layers)
                   for x in "kv" for h in range(shape.n_heads)], np.int64)


def pair_index(i: Any, j: Any) -> Any:
  """Index of the (query i, key j <= i) pair in the packed crossing axis."""
  return i * (i + 1) // 2 + j


def pairs(n_pos: int) -> tuple[np.ndarray, np.ndarray]:
  """(query positions i, key positions j) of every packed pair, in pair order."""
  i, j = np.tril_indices(n_pos)
  return i.astype(np.int64), j.astype(np.int64)


@dataclasses.dataclass
class PositionScores:
  """Scores of every position-level edge.

  Attributes:
    shape: the graph shape (`GraphShape`, or a model config).
    local: Float[ndarray, "pos sender receiver"], non-crossing edges (0 in k/v columns and on
      invalid edges).
    crossing: Float[ndarray, "pair sender kv"], crossing edges, pairs packed (`pair_index`), kv
      receivers as `kv_receivers` (0 for senders not upstream).
    convention: the scores' sign convention ("metric" in memory, "loss" in files).
  """

  shape: Any
  local: np.ndarray
  crossing: np.ndarray
  convention: str = conv.METRIC

  @property
  def n_pos(self) -> int:
    return int(self.local.shape[0])

  @property
  def layout(self) -> Layout:
    return layout_for(shape_key(self.shape))

  def edge_scores(self) -> np.ndarray:
    """Float [sender, receiver]: the scores summed over positions (and query positions): the
    edge-level scores of the same run, for the gradient methods (linear in the position split)."""
    out = self.local.sum(0, dtype=np.float64)
    out[:, kv_receivers(self.shape)] += self.crossing.sum(0, dtype=np.float64)
    return out

  def with_convention(self, convention: str) -> PositionScores:
    """The same scores in `convention` (negated if it differs; no -0.0)."""
    if conv.check(convention) == self.convention:
      return self
    flip = lambda x: conv.displayed(x, conv.METRIC)  # noqa: E731 (x * -1 + 0)
    return PositionScores(self.shape, flip(self.local), flip(self.crossing), convention)

  def entries(self) -> list[tuple[int, int, int, int, float]]:
    """Every non-zero entry as (sender, sender position, receiver, receiver position, score)."""
    out = []
    for p, s, r in zip(*np.nonzero(self.local), strict=True):
      out.append((int(s), int(p), int(r), int(p), float(self.local[p, s, r])))
    qi, kj = pairs(self.n_pos)
    kv = kv_receivers(self.shape)
    for k, s, c in zip(*np.nonzero(self.crossing), strict=True):
      out.append((int(s), int(kj[k]), int(kv[c]), int(qi[k]), float(self.crossing[k, s, c])))
    return out

  def valid(self) -> tuple[np.ndarray, np.ndarray]:
    """(Bool[ndarray, "pos sender receiver"], Bool[ndarray, "pair sender kv"]): the entries that
    are position edges (a valid edge; k/v receivers only as crossing edges)."""
    lay, kv = self.layout, kv_receivers(self.shape)
    local = np.broadcast_to(lay.valid, self.local.shape).copy()
    local[:, :, kv] = False
    return local, np.broadcast_to(lay.valid[:, kv], self.crossing.shape)

  @property
  def n_edges(self) -> int:
    """How many position edges there are (`valid`), scored zero or not."""
    return int(sum(np.count_nonzero(v) for v in self.valid()))

  def select(self, n: int, absolute: bool = True) -> list[tuple[int, int, int, int, float]]:
    """A circuit: the n best position edges as (sender, sender position, receiver, receiver
    position, score), best first, ranked as `circuits.selection.ranked` ranks edges (|score|, or
    signed importance in this convention; ties by index, local edges before crossing ones), so
    `select(n)` is a prefix of `select(n + 1)`. GraphError if n is not in [0, n_edges]."""
    n = check_count(n, self.n_edges, "top_n: n")
    v_local, v_cross = self.valid()
    flat = np.concatenate([np.where(v_local, self.local, np.nan).ravel(),
                           np.where(v_cross, self.crossing, np.nan).ravel()])
    order = selection.ranked(flat, absolute=absolute, score_convention=self.convention)[:n]
    qi, kj = pairs(self.n_pos)
    kv = kv_receivers(self.shape)
    out = []
    for k in order.tolist():
      if k < self.local.size:
        p, s, r = np.unravel_index(k, self.local.shape)
        out.append((int(s), int(p), int(r), int(p), float(self.local[p, s, r])))
      else:
        c, s, x = np.unravel_index(k - self.local.size, self.crossing.shape)
        out.append((int(s), int(kj[c]), int(kv[x]), int(qi[c]), float(self.crossing[c, s, x])))
    return out

  def names(self, edges: list[tuple[int, int, int, int, float]]) -> list[tuple[str, float]]:
    """(name, score) of `entries`/`select` rows."""
    lay = self.layout
    return [(edge_name(lay, s, ps, r, pr), v) for s, ps, r, pr, v in edges]

  def top(self, n: int, receiver: str | None = None) -> list[tuple[str, float]]:
    """The n most important edges by name (importance = the convention's sign times the score),
    optionally only those into `receiver` (e.g. `a1.h0<k>`)."""
    lay = self.layout
    rows = most_important(lay, self.convention, self.entries(), n, receiver)
    return [(edge_name(lay, s, ps, r, pr), v) for s, ps, r, pr, v in rows]


def most_important(layout: Layout, convention: str, entries: list, n: int,
                   receiver: str | None = None) -> list:
  """The n most important of `entries` ((sender, sender place, receiver, receiver place, score)
  rows; importance = the convention's sign times the score), optionally only those into
  `receiver` (e.g. `a1.h0<k>`; GraphError if the model has no such receiver)."""
  r_only = None if receiver is None else layout.receiver_index.get(receiver)
  if receiver is not None and r_only is None:
    raise GraphError(f"{receiver!r} is not a receiver of this model ({layout.describe()})")
  sign = conv.importance_sign(convention)
  rows = [e for e in entries if r_only is None or e[2] == r_only]
  rows.sort(key=lambda e: -sign * e[4])
  return rows[:n]


def edge_name(layout: Layout, sender: int, sender_pos: int, receiver: int, receiver_pos: int
              ) -> str:
  """`a0.h3@5->a1.h0<k>@9`; GraphError unless it is an edge: a valid edge, at one position, or a
  k/v receiver read at a position >= the sender's."""
  base = layout.edge_name(sender, receiver)
  crossing = receiver in set(kv_receivers(GraphShape(layout.n_layers, layout.n_heads,
                                                     layout.parallel)).tolist())
  if sender_pos < 0 or (receiver_pos < sender_pos if crossing else receiver_pos != sender_pos):
    raise GraphError(f"{base} at positions {sender_pos} -> {receiver_pos} is not a position edge "
                     f"({'key <= query' if crossing else 'same position'})")
  s, r = base.split("->")
  return f"{s}@{sender_pos}->{r}@{receiver_pos}"


def parse_edge_name(layout: Layout, name: str) -> tuple[int, int, int, int]:
  """(sender, sender position, receiver, receiver position) of a position edge name;
  GraphError naming it otherwise."""
  m = _NAME.match(name) if isinstance(name, str) else None
  idx = m and layout.parse_edge(f"{m.group(1)}->{m.group(3)}")
  if not idx:
    raise GraphError(f"{name!r} is not a position edge of this model ({layout.describe()}), "
                     "e.g. 'a0.h3@5->a1.h0<k>@9'")
  out = (idx[0], int(m.group(2)), idx[1], int(m.group(4)))
  edge_name(layout, *out)  # checks the positions
  return out


def _meta(scores: PositionScores) -> dict[str, Any]:
  lay = scores.layout
  return {"format": FORMAT, "version": VERSION, "n_layers": lay.n_layers,
          "n_heads": lay.n_heads, "parallel_attn_mlp": lay.parallel, "n_pos": scores.n_pos,
          conv.KEY: conv.LOSS}


def _empty(meta: dict[str, Any], where: str) -> PositionScores:
  if meta.get("format") != FORMAT:
    raise GraphError(f"{where} is not a {FORMAT} file (format {meta.get('format')!r})")
  try:
    shape = GraphShape(int(meta["n_layers"]), int(meta["n_heads"]),
                       bool(meta["parallel_attn_mlp"]))
    n_pos = int(meta["n_pos"])
  except (KeyError, TypeError, ValueError) as e:
    raise GraphError(f"{where}: missing or bad field {e}") from None
  lay = layout_for(shape_key(shape))
  local = np.zeros((n_pos, lay.n_senders, lay.n_receivers), np.float32)
  crossing = np.zeros((n_pos * (n_pos + 1) // 2, lay.n_senders, 2 * shape.n_layers
                       * shape.n_heads), np.float32)
  return PositionScores(shape, local, crossing, conv.LOSS)


def write_npz(path: str | os.PathLike, local: np.ndarray, crossing: np.ndarray,
              meta: dict) -> None:
  """Write local and crossing scores as .npz: `local`, `crossing` and `meta` as JSON."""
  with open(path, "wb") as f:
    np.savez(f, local=local, crossing=crossing, meta=np.array(json.dumps(meta)))


def read_npz(path: str | os.PathLike, what: str, empty):
  """`write_npz`'s file as `empty(meta, path)` (scores of zeros of the shapes the meta gives) with
  its `local` and `crossing` arrays; GraphError (naming `what`) for another file or shapes that do
  not match the meta."""
  try:
    with np.load(path) as z:
      meta = json.loads(str(z["meta"]))
      local, crossing = z["local"], z["crossing"]
  except (OSError, KeyError, ValueError) as e:
    raise GraphError(f"{path}: not a {what} .npz ({e})") from None
  out = empty(meta, str(path))
  if local.shape != out.local.shape or crossing.shape != out.crossing.shape:
    raise GraphError(f"{path}: arrays of shape {local.shape}, {crossing.shape} do not match its "
                     f"meta (expected {out.local.shape}, {out.crossing.shape})")
  return dataclasses.replace(out, local=local, crossing=crossing)


def to_npz(scores: PositionScores, path: str | os.PathLike) -> None:
  """Write `scores` (graph.json's sign) as .npz: `local`, `crossing` and a JSON `meta`."""
  s = scores.with_convention(conv.LOSS)
  write_npz(path, s.local, s.crossing, _meta(scores))


def from_npz(path: str | os.PathLike) -> PositionScores:
  """Read `to_npz`'s file (scores in the `loss` convention); GraphError for another file."""
  return read_npz(path, "position-scores", _empty)


def to_json(scores: PositionScores, path: str | os.PathLike, *,
            edges: list[tuple[int, int, int, int, float]] | None = None,
            meta: dict[str, Any] | None = None) -> None:
  """Write the non-zero scores by name (graph.json's sign: higher = more important); with
  `edges` (`select`'s rows: a circuit) only those, in their order; `meta` as a "meta" section
  (the run's provenance; `from_json` ignores it)."""
  s = scores.with_convention(conv.LOSS)
  lay = s.layout
  rows = s.entries() if edges is None else [(a, pa, b, pb, _at(s, a, pa, b, pb))
                                            for a, pa, b, pb, _ in edges]
  named = {edge_name(lay, a, pa, b, pb): v for a, pa, b, pb, v in rows}
  with open(path, "w") as f:
    json.dump({**_meta(scores), "edges": named, **({"meta": meta} if meta else {})}, f,
              indent=1)


def _at(scores: PositionScores, s: int, ps: int, r: int, pr: int) -> float:
  kv = {int(x): c for c, x in enumerate(kv_receivers(scores.shape))}
  if r in kv:
    return float(scores.crossing[pair_index(pr, ps), s, kv[r]])
  return float(scores.local[ps, s, r])


def from_json(path: str | os.PathLike) -> PositionScores:
  """Read `to_json`'s file; GraphError naming the file and the first bad edge name."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise GraphError(f"{path}: cannot read position scores ({e})") from None
  out = _empty(d if isinstance(d, dict) else {}, str(path))
  lay, kv = out.layout, {int(r): c for c, r in enumerate(kv_receivers(out.shape))}
  for name, v in dict(d.get("edges", {})).items():
    s, ps, r, pr = parse_edge_name(lay, name)
    if max(ps, pr) >= out.n_pos:
      raise GraphError(f"{path}: edge {name!r} is outside the file's {out.n_pos} positions")
    if r in kv:
      out.crossing[pair_index(pr, ps), s, kv[r]] = v
    else:
      out.local[ps, s, r] = v
  return out


def edge_masks(shape: Any, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
  """(Bool[ndarray, "pos sender receiver"], Bool[ndarray, "pair sender kv"]): every position edge
  of a graph of `shape` over `n_pos` positions (as `PositionScores.valid`, without scores)."""
  lay, kv = layout_for(shape_key(shape)), kv_receivers(shape)
  local = np.broadcast_to(lay.valid, (n_pos,) + lay.valid.shape).copy()
  local[:, :, kv] = False
  crossing = np.broadcast_to(lay.valid[:, kv], (n_pos * (n_pos + 1) // 2,) + (lay.n_senders,
                                                                             kv.size)).copy()
  return local, crossing


def circuit_masks(shape: Any, n_pos: int, edges: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
  """A position circuit as masks (Float32 `local` [pos, sender, receiver], `crossing` [pair,
  sender, kv]; 1 = in the circuit) from `PositionScores.select`'s rows (sender, sender position,
  receiver, receiver position[, score]). GraphError for a row that is not a position edge or lies
  outside the `n_pos` positions."""
  lay = layout_for(shape_key(shape))
  local, crossing = (np.zeros(m.shape, np.float32) for m in edge_masks(shape, n_pos))
  kv = {int(r): c for c, r in enumerate(kv_receivers(shape))}
  for row in edges:
    s, ps, r, pr = (int(x) for x in row[:4])
    edge_name(lay, s, ps, r, pr)  # checks that it is a position edge
    if not lay.valid[s, r] or max(ps, pr) >= n_pos:
      raise GraphError(f"{lay.edge_name(s, r)} at positions {ps} -> {pr} is not an edge of a "
                       f"{n_pos}-position graph")
    if r in kv:
      crossing[pair_index(pr, ps), s, kv[r]] = 1.0
    else:
      local[ps, s, r] = 1.0
  return local, crossing


def every_position(shape: Any, n_pos: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The position circuit holding every position instance of an edge-level circuit `weights`
  (Float [sender, receiver], 1 = in): each non-k/v edge at every position, each k/v edge at every
  (query i, key j <= i) pair. Its metric is the edge-level circuit's."""
  w = np.asarray(weights, np.float32)
  local, crossing = edge_masks(shape, n_pos)
  kv = kv_receivers(shape)
  return (np.where(local, w[None], 0.0).astype(np.float32),
          np.where(crossing, w[None][:, :, kv], 0.0).astype(np.float32))


def selection_ranks(scores: PositionScores, absolute: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(Int32[ndarray, "pos sender receiver"], Int32[ndarray, "pair sender kv"]): each position
  edge's rank in `scores.select`'s order (0 = best), `scores.n_edges` where there is no edge, so
  `rank < n` is the mask of `select(n, absolute)`."""
  v_local, v_cross = scores.valid()
  flat = np.concatenate([np.where(v_local, scores.local, np.nan).ravel(),
                         np.where(v_cross, scores.crossing, np.nan).ravel()])
  order = selection.ranked(flat, absolute=absolute, score_convention=scores.convention)
  rank = np.full(flat.size, scores.n_edges, np.int32)
  rank[order] = np.arange(order.size, dtype=np.int32)
  n = scores.local.size
  return rank[:n].reshape(scores.local.shape), rank[n:].reshape(scores.crossing.shape)
