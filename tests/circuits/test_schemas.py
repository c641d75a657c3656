"""Schemas: span aggregation of position scores (sums, means, max |.|), the four bad inputs, the
induction and IOI schemas, and the bundled model's K-composition edge at span level."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer

from jaxinterp import tasks
from jaxinterp.attribution import positions as P
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits import schemas as S
from jaxinterp.circuits.layout import GraphShape, valid_edges
from jaxinterp.groundtruth import toy

SHAPE = GraphShape(2, 2, False)
GPT2_TOK = pathlib.Path(__file__).resolve().parents[3] / "shared" / "models" / "gpt2-tokenizer" \
    / "tokenizer.json"


def _scores(rng, n_pos):
  lay = cpos.layout_for(cpos.shape_key(SHAPE))
  kv = cpos.kv_receivers(SHAPE)
  local = rng.normal(size=(n_pos, lay.n_senders, lay.n_receivers)) * lay.valid
  local[:, :, kv] = 0
  crossing = rng.normal(size=(n_pos * (n_pos + 1) // 2, lay.n_senders, kv.size)) * lay.valid[:, kv]
  return cpos.PositionScores(SHAPE, local.astype(np.float32), crossing.astype(np.float32))


SCHEMA = S.Schema(("a", "b", "c"))
# Two structures over 6 positions: every position covered, b before a in the second row.
SPANS = np.array([[[0, 2], [2, 5], [5, 6]], [[3, 5], [0, 3], [5, 6]]])


def test_sum_over_spans_is_the_position_total():
  rng = np.random.default_rng(0)
  rows = [_scores(rng, 6) for _ in range(2)]
  got = S.aggregate(rows, SPANS, SCHEMA, "sum")
  total = np.mean([r.edge_scores() for r in rows], 0)
  np.testing.assert_allclose(got.edge_scores(), total, atol=1e-5)
  assert np.abs(total).max() > 1
  # The row's own crossing edge from span a (key) to span b (query): pairs j in a, i in b, j <= i.
  qi, kj = cpos.pairs(6)
  sel = (kj >= 0) & (kj < 2) & (qi >= 2) & (qi < 5)
  np.testing.assert_allclose(S.aggregate_row(rows[0], SPANS[0], "sum")[1][0, 1],
                             rows[0].crossing[sel].sum(0), atol=1e-5)
  # In row 1 span a (3..4) comes after b (0..2): no a -> b crossing pairs, so that row adds 0.
  assert not np.any(S.aggregate_row(rows[1], SPANS[1], "sum")[1][0, 1])
  np.testing.assert_allclose(got.crossing[0, 1], rows[0].crossing[sel].sum(0) / 2, atol=1e-5)


def test_mean_and_max_abs_keep_the_sign():
  rng = np.random.default_rng(1)
  row = _scores(rng, 6)
  lay = row.layout
  r = lay.receiver_index["logits"]  # input -> logits at each position
  row.local[:, 0, r] = [0.5, -3.0, 1.0, 2.0, -1.0, 7.0]
  loc_mean, _ = S.aggregate_row(row, SPANS[0], "mean")
  loc_max, _ = S.aggregate_row(row, SPANS[0], "max_abs")
  np.testing.assert_allclose(loc_mean[:, 0, r], [-1.25, 2 / 3, 7.0], rtol=1e-6)
  np.testing.assert_allclose(loc_max[:, 0, r], [-3.0, 2.0, 7.0])
  only = np.zeros_like(loc_max)
  only[:, 0, r] = loc_max[:, 0, r]
  span = S.SpanScores(SHAPE, SCHEMA.names, only, np.zeros((3, 3) + row.crossing.shape[1:]),
                      "max_abs", 1)  # metric convention: the most negative is the most important
  assert span.top(2) == [("input@a->logits@a", -3.0), ("input@b->logits@b", 2.0)]


@pytest.mark.parametrize("spans,match", [
    ({"a": (0, 3), "b": (2, 5), "c": (5, 6)}, r"row 0: spans 'a' \[0, 3\) and 'b' \[2, 5\) "
     "overlap"),
    ({"a": (0, 2), "b": (2, 5), "c": (5, 7)}, r"row 0: span 'c' \[5, 7\) is outside the "
     "prompt's 6 tokens"),
    ({"a": (0, 2), "c": (5, 6)}, r"row 0: no span 'b' \(the schema names"),
])
def test_bad_spans_name_the_row_and_span(spans, match):
  with pytest.raises(S.SchemaError, match=match):
    S.check_spans(SCHEMA, spans, 6, 0)


def test_unknown_aggregation():
  row = _scores(np.random.default_rng(2), 6)
  with pytest.raises(S.SchemaError, match=r"unknown span aggregation 'median'; choose from"):
    S.aggregate([row], SPANS[:1], SCHEMA, "median")


def test_dataset_spans_names_the_row():
  ds = tasks.make_induction(3, 4, 50, seed=0, bos_id=0)
  ds.clean[2, -1] = 49  # row 2's final token no longer occurs earlier
  with pytest.raises(S.SchemaError, match=r"^row 2: the final token 49 does not occur earlier$"):
    S.dataset_spans(S.induction_schema(), ds)
  with pytest.raises(S.SchemaError, match=r"^row 1: no span 'last'"):
    S.dataset_spans(S.Schema(("all", "last")), ds, [{"all": (0, 7), "last": (7, 8)},
                                                    {"all": (0, 8)}, {"all": (0, 8)}])


def test_induction_schema_spans():
  ds = tasks.make_induction(2, 5, 50, seed=0, bos_id=0)  # BOS r1..r5 r1..r4: A = r4 at 4
  spans = S.dataset_spans(S.induction_schema(), ds)
  assert spans[0].tolist() == [[0, 1], [1, 4], [4, 5], [5, 6], [6, 9], [9, 10]]


def test_ioi_schema_spans():
  if not GPT2_TOK.exists():
    pytest.skip("../shared absent")
  tok = Tokenizer.from_file(str(GPT2_TOK))
  ds = tasks.make_ioi(tok, 12, seed=0)
  schema = S.ioi_schema()
  spans = S.dataset_spans(schema, ds)
  k = {n: i for i, n in enumerate(schema.names)}
  orders = set()
  for r in range(len(ds)):
    toks, sp = ds.clean[r], spans[r]
    assert toks[sp[k["io"], 0]] == ds.labels["correct"][r]
    assert toks[sp[k["s1"], 0]] == toks[sp[k["s2"], 0]] == ds.labels["incorrect"][r]
    assert sp[k["end"]].tolist() == [ds.lengths[r] - 1, ds.lengths[r]]
    covered = np.concatenate([np.arange(a, b) for a, b in sp])
    assert sorted(covered.tolist()) == list(range(ds.lengths[r]))  # every position, once
    orders.add(bool(sp[k["io"], 0] < sp[k["s1"], 0]))
  assert orders == {True, False}  # rows of both structures


def _mixed_induction(n_each):
  """Toy induction rows of two structures: blocks of 12 and 16 tokens (right padded)."""
  a = toy.induction_task_dataset(n_each, seed=0, seq_len=12)
  b = toy.induction_task_dataset(n_each, seed=1, seq_len=16)
  pad = lambda x: np.pad(x, ((0, 0), (0, b.clean.shape[1] - x.shape[1])),  # noqa: E731
                         constant_values=a.pad_id)
  return dataclasses.replace(
      b, clean=np.concatenate([pad(a.clean), b.clean]),
      corrupted=np.concatenate([pad(a.corrupted), b.corrupted]),
      lengths=np.concatenate([a.lengths, b.lengths]),
      labels={k: np.concatenate([a.labels[k], b.labels[k]]) for k in a.labels})


@pytest.mark.slow
def test_bundled_model_span_k_composition():
  """On rows of two structures, the top span edge into a1.h0<k> is a0.h3 at the token after the
  earlier occurrence of the final token, under every aggregation; per-row sums match the batch's
  position-level total."""
  model = toy.load_toy()
  ds = _mixed_induction(2)
  schema = S.induction_schema()
  spans = S.dataset_spans(schema, ds)
  assert spans[0, 3].tolist() == [12, 13] and spans[-1, 3].tolist() == [16, 17]
  rows = list(P.attribute_position_rows(model.cfg, model.params, ds, "EAP-IG-inputs", quiet=True,
                                        ig_steps=3))
  for how in S.AGGREGATIONS:
    top = S.aggregate(rows, spans, schema, how).top(1, "a1.h0<k>")[0][0]
    assert top == "a0.h3@after_first_A->a1.h0<k>@last", (how, top)
  whole = P.attribute_positions(model.cfg, model.params, ds, "EAP-IG-inputs", batch_size=4,
                                quiet=True, ig_steps=3).scores.edge_scores()
  got = S.aggregate(rows, spans, schema, "sum").edge_scores()
  valid = valid_edges(model.cfg)
  np.testing.assert_allclose(got[valid], whole[valid], atol=1e-4 * np.abs(whole).max())
