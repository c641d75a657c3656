"""Schemas: named spans with the same role across prompts (PEAP, Haklay et al. 2025), and
position-level scores aggregated into span-level edges.

A `Schema` is an ordered tuple of span names; each row of a dataset gives every name a token range
[start, end) of its prompt, explicitly or through the schema's `locate` function of the row's
tokens (and labels). Rows may differ in structure (the IO name before or after the subject, a
repeated block of another length); clean and corrupted share each row's spans, located in the clean
prompt: positions are aligned by index, so a corrupted prompt of another token length (fitted to the
clean length, `tasks.Dataset.fitted`, as EAP-IG runs it) is patched position by position too.

Span-level edges extend the position names: `a0.h3@after_first_A->a1.h0<k>@last`. A non-crossing
edge joins a sender and a receiver at the same position of one span (`a0.h3@s2->m1@s2`); a crossing
edge joins a sender at key position j in span A to a head's k or v input read by query position i
in span B (j <= i, A == B allowed). A row's span-edge score aggregates the row's position scores
over those positions (`sum`, `mean`, or `max_abs`: the value of largest |.|, sign kept; PEAP's
`max_abs` keeps |.| only);
the span-edge score is the mean over rows, every row counted (a row where the span edge has no
positions, an empty span or a key span after the query span, contributes 0). So with `sum` and
spans covering every position, the span edges sum to the position-level total: the edge score.
A circuit of span edges, its files and its per-row position masks: `circuits.span_circuits`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxinterp.circuits import convention as conv
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits.layout import GraphError, Layout, layout_for, shape_key

AGGREGATIONS = ("sum", "mean", "max_abs")


class SchemaError(ValueError):
  """Bad schema input: overlapping spans, a span outside its prompt, a row without a span the
  schema names, an unknown aggregation."""


@dataclasses.dataclass(frozen=True)
class Schema:
  """Ordered span names, and optionally how to find them in a prompt.

  Attributes:
    names: the span names, in display order (no '@', '->', '<' or whitespace in a name).
    locate: optional `(tokens Int[ndarray, "length"], labels {str: value}) -> {name: (start,
      end)}`, the spans of one row from its clean tokens (BOS included, no padding) and its
      labels; it raises `SchemaError` for a row it cannot read.
  """

  names: tuple[str, ...]
  locate: Callable[[np.ndarray, Mapping[str, Any]], Mapping[str, tuple[int, int]]] | None = None

  def __post_init__(self):
    names = tuple(self.names)
    object.__setattr__(self, "names", names)
    if not names:
      raise SchemaError("a schema needs at least one span name")
    for n in names:
      if not isinstance(n, str) or not n or any(c in n for c in "@<> \t\n") or "->" in n:
        raise SchemaError(f"span name {n!r} is empty or holds '@', '->', '<', '>' or whitespace")
    if len(set(names)) != len(names):
      raise SchemaError(f"span names repeat: {names}")


def check_aggregation(how: str) -> str:
  """`how` if it is one of AGGREGATIONS; SchemaError otherwise."""
  if how not in AGGREGATIONS:
    raise SchemaError(f"unknown span aggregation {how!r}; choose from {AGGREGATIONS}")
  return how


def check_spans(schema: Schema, spans: Mapping[str, Sequence[int]], length: int, row: int
                ) -> np.ndarray:
  """Int [span, 2]: one row's spans in schema order; SchemaError naming the row and span for a
  missing or unknown span, one outside the prompt's `length` tokens, or two that overlap. Empty
  spans (start == end) are allowed and cover nothing."""
  unknown = sorted(set(spans) - set(schema.names))
  if unknown:
    raise SchemaError(f"row {row}: span {unknown[0]!r} is not in the schema {schema.names}")
  out = np.zeros((len(schema.names), 2), np.int64)
  for k, name in enumerate(schema.names):
    if name not in spans:
      raise SchemaError(f"row {row}: no span {name!r} (the schema names {schema.names})")
    try:
      start, end = (int(x) for x in spans[name])
    except (TypeError, ValueError):
      raise SchemaError(f"row {row}: span {name!r} is {spans[name]!r}, not (start, end)") from None
    if not 0 <= start <= end <= length:
      raise SchemaError(f"row {row}: span {name!r} [{start}, {end}) is outside the prompt's "
                        f"{length} tokens")
    out[k] = start, end
  order = np.argsort(out[:, 0], kind="stable")
  live = [k for k in order if out[k, 1] > out[k, 0]]
  for a, b in zip(live, live[1:], strict=False):
    if out[b, 0] < out[a, 1]:
      raise SchemaError(f"row {row}: spans {schema.names[a]!r} [{out[a, 0]}, {out[a, 1]}) and "
                        f"{schema.names[b]!r} [{out[b, 0]}, {out[b, 1]}) overlap")
  return out


def dataset_spans(schema: Schema, dataset, spans: Sequence[Mapping[str, Sequence[int]]] | None
                  = None) -> np.ndarray:
  """Int [row, span, 2]: every row's spans, given (`spans`, one mapping name -> (start, end) per
  row) or found by `schema.locate` on the row's clean tokens and labels. SchemaError naming the
  row otherwise (see `check_spans`)."""
  n = len(dataset)
  if spans is None:
    if schema.locate is None:
      raise SchemaError(f"schema {schema.names} has no locate function: give the spans per row")
    spans = []
    for r in range(n):
      tokens = np.asarray(dataset.clean[r, :int(dataset.lengths[r])])
      labels = {k: np.asarray(v[r]) for k, v in dataset.labels.items()}
      try:
        spans.append(schema.locate(tokens, labels))
      except SchemaError as e:
        raise SchemaError(f"row {r}: {e}") from None
  elif len(spans) != n:
    raise SchemaError(f"{len(spans)} rows of spans for a dataset of {n} rows")
  return np.stack([check_spans(schema, s, int(dataset.lengths[r]), r)
                   for r, s in enumerate(spans)]) if n else np.zeros((0, len(schema.names), 2),
                                                                      np.int64)


def _owner(spans: np.ndarray, n_pos: int) -> np.ndarray:
  """Int [pos]: the span covering each position, -1 for none."""
  own = np.full(n_pos, -1, np.int64)
  for k, (a, b) in enumerate(spans):
    own[a:b] = k
  return own


def _reduce(values: np.ndarray, groups: np.ndarray, n_groups: int, how: str) -> np.ndarray:
  """Float64 [group, ...]: `values` [item, ...] aggregated by group id (-1: dropped); an empty
  group is 0."""
  keep = groups >= 0
  values, groups = values[keep].astype(np.float64), groups[keep]
  out = np.zeros((n_groups,) + values.shape[1:], np.float64)
  if how == "sum" or how == "mean":
    np.add.at(out, groups, values)
    if how == "mean":
      count = np.bincount(groups, minlength=n_groups).astype(np.float64)
      out /= np.maximum(count, 1).reshape((-1,) + (1,) * (values.ndim - 1))
    return out
  for g in np.unique(groups):
    v = values[groups == g]
    pick = np.argmax(np.abs(v), axis=0)  # first of the largest |.|
    out[g] = np.take_along_axis(v, pick[None], 0)[0]
  return out


def aggregate_row(scores: cpos.PositionScores, spans: np.ndarray, how: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """One row's span-edge scores from its position scores.

  Args:
    scores: the row's `PositionScores` (n_pos at least its prompt's length).
    spans: Int[ndarray, "span 2"], the row's spans (`check_spans`).
    how: one of AGGREGATIONS.

  Returns:
    (local Float64[ndarray, "span sender receiver"], crossing Float64[ndarray, "key_span
    query_span sender kv"]): non-crossing edges within a span, and crossing edges from a sender
    in the key span to a k/v input read in the query span.
  """
  check_aggregation(how)
  n = len(spans)
  own = _owner(np.asarray(spans), scores.n_pos)
  local = _reduce(scores.local, own, n, how)
  qi, kj = cpos.pairs(scores.n_pos)
  oq, ok = own[qi], own[kj]
  group = np.where((oq >= 0) & (ok >= 0), ok * n + oq, -1)
  crossing = _reduce(scores.crossing, group, n * n, how)
  return local, crossing.reshape((n, n) + scores.crossing.shape[1:])


@dataclasses.dataclass
class SpanScores:
  """Span-level edge scores: the mean over rows of each row's aggregated position scores.

  Attributes:
    shape: the graph shape (`GraphShape`, or a model config).
    names: the schema's span names.
    local: Float[ndarray, "span sender receiver"], non-crossing edges within a span.
    crossing: Float[ndarray, "key_span query_span sender kv"], crossing edges (kv receivers as
      `circuits.positions.kv_receivers`).
    aggregation: how positions were aggregated in each row (AGGREGATIONS).
    n_rows: the rows averaged.
    convention: the scores' sign convention (that of the position scores).
    schema: the schema's name ("induction", "ioi"), for files; None if unnamed.
  """

  shape: Any
  names: tuple[str, ...]
  local: np.ndarray
  crossing: np.ndarray
  aggregation: str
  n_rows: int
  convention: str = conv.METRIC
  schema: str | None = None

  @property
  def layout(self) -> Layout:
    return layout_for(shape_key(self.shape))

  def edge_scores(self) -> np.ndarray:
    """Float [sender, receiver]: every span edge summed; with `sum` and spans covering every
    position, the position-level total (the edge-level scores of the same run)."""
    out = self.local.sum(0, dtype=np.float64)
    out[:, cpos.kv_receivers(self.shape)] += self.crossing.sum((0, 1), dtype=np.float64)
    return out

  def entries(self) -> list[tuple[int, int, int, int, float]]:
    """Every non-zero span edge as (sender, sender span, receiver, receiver span, score)."""
    out = []
    for k, s, r in zip(*np.nonzero(self.local), strict=True):
      out.append((int(s), int(k), int(r), int(k), float(self.local[k, s, r])))
    kv = cpos.kv_receivers(self.shape)
    for a, b, s, c in zip(*np.nonzero(self.crossing), strict=True):
      out.append((int(s), int(a), int(kv[c]), int(b), float(self.crossing[a, b, s, c])))
    return out

  def top(self, n: int, receiver: str | None = None) -> list[tuple[str, float]]:
    """The n most important span edges by name (importance = the convention's sign times the
    score), optionally only those into `receiver` (e.g. `a1.h0<k>`)."""
    lay = self.layout
    rows = cpos.most_important(lay, self.convention, self.entries(), n, receiver)
    return [(span_edge_name(lay, self.names, *e[:4]), e[4]) for e in rows]


def span_edge_name(layout: Layout, names: Sequence[str], sender: int, sender_span: int,
                   receiver: int, receiver_span: int) -> str:
  """`a0.h3@after_first_A->a1.h0<k>@last`; GraphError unless it is a span edge (a valid edge,
  within one span unless the receiver is a head's k or v input)."""
  base = layout.edge_name(sender, receiver)
  kv = set(cpos.kv_receivers(cpos.GraphShape(layout.n_layers, layout.n_heads,
                                             layout.parallel)).tolist())
  if receiver not in kv and sender_span != receiver_span:
    raise GraphError(f"{base} from span {names[sender_span]!r} to {names[receiver_span]!r} is "
                     "not a span edge (non-crossing edges stay within a span)")
  s, r = base.split("->")
  return f"{s}@{names[sender_span]}->{r}@{names[receiver_span]}"


def aggregate(rows: Iterable[cpos.PositionScores], spans: np.ndarray, schema: Schema,
              how: str = "sum") -> SpanScores:
  """Span-level edge scores: each row's position scores aggregated over its spans
  (`aggregate_row`), then the mean over rows (every row counted).

  Args:
    rows: one `PositionScores` per dataset row, in order (e.g.
      `attribution.positions.attribute_position_rows`); consumed one at a time.
    spans: Int[ndarray, "row span 2"] (`dataset_spans`).
    schema: the spans' schema.
    how: "sum", "mean" or "max_abs" (largest |.|, sign kept).
  """
  check_aggregation(how)
  spans = np.asarray(spans)
  if spans.ndim != 3 or spans.shape[1:] != (len(schema.names), 2):
    raise SchemaError(f"spans of shape {spans.shape} do not match the schema's "
                      f"{len(schema.names)} spans (expected [row, {len(schema.names)}, 2])")
  local = crossing = first = None
  n = 0
  for r, scores in enumerate(rows):
    if r >= len(spans):
      raise SchemaError(f"more rows of scores than the {len(spans)} rows of spans")
    if int(spans[r].max(initial=0)) > scores.n_pos:
      raise SchemaError(f"row {r}: spans reach position {int(spans[r].max())}, past the scores' "
                        f"{scores.n_pos} positions")
    loc, cr = aggregate_row(scores, spans[r], how)
    local = loc if local is None else local + loc
    crossing = cr if crossing is None else crossing + cr
    first = first or scores
    n += 1
  if n != len(spans) or n == 0:
    raise SchemaError(f"{n} rows of scores for {len(spans)} rows of spans")
  return SpanScores(first.shape, schema.names, (local / n).astype(np.float32),
                    (crossing / n).astype(np.float32), how, n, first.convention)


def _single(tokens: np.ndarray, token: int, what: str, start: int = 0) -> int:
  hits = np.flatnonzero(tokens[start:] == token) + start
  if hits.size != 1:
    raise SchemaError(f"{what} (token {token}) occurs {hits.size} times, not once")
  return int(hits[0])


def _locate_induction(bos: bool):
  def locate(tokens: np.ndarray, labels: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    last = len(tokens) - 1
    off = int(bos)
    earlier = np.flatnonzero(tokens[off:last] == tokens[last]) + off
    if earlier.size == 0:
      raise SchemaError(f"the final token {int(tokens[last])} does not occur earlier")
    a = int(earlier[0])
    if a + 1 >= last:
      raise SchemaError(f"the final token's earlier occurrence at {a} leaves no token between "
                        "it and the last position")
    return {"bos": (0, off), "prefix": (off, a), "first_A": (a, a + 1),
            "after_first_A": (a + 1, a + 2), "filler": (a + 2, last), "last": (last, last + 1)}
  return locate


def induction_schema(bos: bool = True) -> Schema:
  """The induction schema: a prompt `[BOS] ... A B ... A` predicting B at its last token.

  Spans (covering every position): `bos` (empty without a BOS), `prefix` (before A's earlier
  occurrence), `first_A` (the earliest earlier occurrence of the final token), `after_first_A`
  (the token right after it: where a previous-token head writes A for the induction head's key),
  `filler` (up to the last token), `last`. Works for rows of any block length (`make_induction`,
  `groundtruth.toy.induction_task_dataset`); SchemaError for a row whose final token does not
  occur earlier.
  """
  return Schema(("bos", "prefix", "first_A", "after_first_A", "filler", "last"),
                _locate_induction(bos))


def _locate_ioi(bos: bool, io_label: str, s_label: str):
  def locate(tokens: np.ndarray, labels: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    for key in (io_label, s_label):
      if key not in labels or np.ndim(labels[key]) != 0:
        raise SchemaError(f"IOI schema needs a single-token label {key!r}")
    off = int(bos)
    io = _single(tokens, int(labels[io_label]), "the IO name", off)
    s_hits = np.flatnonzero(tokens[off:] == int(labels[s_label])) + off
    if s_hits.size != 2:
      raise SchemaError(f"the subject name (token {int(labels[s_label])}) occurs "
                        f"{s_hits.size} times, not twice")
    s1, s2 = (int(x) for x in s_hits)
    last = len(tokens) - 1
    if not (io < s2 and s1 + 1 < s2 and s1 + 1 != io and s2 < last):
      raise SchemaError(f"names at IO {io}, S1 {s1}, S2 {s2} are not in IOI order "
                        f"(IO and S1, then S2, then the end at {last})")
    first = min(io, s1)
    between = (io + 1, s1) if io < s1 else (s1 + 2, max(io, s1 + 2))
    return {"bos": (0, off), "prefix": (off, first), "io": (io, io + 1), "and": between,
            "s1": (s1, s1 + 1), "s1+1": (s1 + 1, s1 + 2),
            "middle": (max(io, s1 + 1) + 1, s2), "s2": (s2, s2 + 1), "action": (s2 + 1, last),
            "end": (last, last + 1)}
  return locate


def ioi_schema(bos: bool = True, io_label: str = "correct", s_label: str = "incorrect"
               ) -> Schema:
  """The IOI schema (Wang et al. 2023's positions), found by token search for the names.

  The IO name is the token of label `io_label` (the answer), the subject the token of `s_label`
  (it must occur exactly twice). Spans (covering every position): `bos`, `prefix` (before the
  first name), `io`, `and` (between the two first names, less `s1+1`: empty when S1 comes
  first), `s1`, `s1+1`, `middle` (after the first clause's names, up to S2), `s2`, `action`
  (after S2, up to the end), `end` (the last token, where the answer is read). Spans come from
  the clean prompt and hold for the corrupted one (aligned by index).
  """
  return Schema(("bos", "prefix", "io", "and", "s1", "s1+1", "middle", "s2", "action", "end"),
                _locate_ioi(bos, io_label, s_label))


SCHEMAS = {"induction": induction_schema, "ioi": ioi_schema}
"""The bundled schemas by name (each a function of `bos`: whether prompts start with BOS)."""


def get_schema(name: str, bos: bool = True) -> Schema:
  """The bundled schema `name` (SCHEMAS); SchemaError naming the choices otherwise."""
  if name not in SCHEMAS:
    raise SchemaError(f"unknown schema {name!r}; choose from {tuple(SCHEMAS)}")
  return SCHEMAS[name](bos)
