"""Span circuits: graph.json and .npz round trips, the exact inverse of span aggregation (a span
edge covers the position edges aggregated into it), and the forward's identities on the bundled
model: every span edge in is the clean metric, none the ablated one, rows of two layouts are each
evaluated at their own positions, and single-position spans give the position circuit's metric."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp.attribution import positions as P
from jaxinterp.circuits import convention as conv
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits import schemas as S
from jaxinterp.circuits import span_circuits as SC
from jaxinterp.circuits.layout import GraphError, GraphShape
from jaxinterp.evaluation import position_circuits as PC
from jaxinterp.groundtruth import toy
from tests.circuits.test_schemas import _mixed_induction, _scores

SHAPE = GraphShape(2, 2, False)
NAMES = ("a", "b", "c")


def _span_scores(rng, names=NAMES):
  local, crossing = SC.edge_masks(SHAPE, len(names))
  return S.SpanScores(SHAPE, names, (rng.normal(size=local.shape) * local).astype(np.float32),
                      (rng.normal(size=crossing.shape) * crossing).astype(np.float32), "mean", 3,
                      schema="test")


def test_json_and_npz_round_trip(tmp_path):
  scores = _span_scores(np.random.default_rng(0))
  loss = SC.with_convention(scores, conv.LOSS)
  path = tmp_path / "graph.json"
  SC.to_json(scores, path, meta={"method": "EAP"})
  back = SC.from_json(path)
  assert back.names == NAMES and back.aggregation == "mean" and back.n_rows == 3
  assert back.schema == "test" and back.convention == conv.LOSS
  np.testing.assert_array_equal(back.local, loss.local)  # bitwise, in graph.json's sign
  np.testing.assert_array_equal(back.crossing, loss.crossing)
  d = json.loads(path.read_text())
  assert d["meta"] == {"method": "EAP", "schema": "test", "span_aggregation": "mean"}
  assert d["score_convention"] == "loss"
  # A circuit: the top 5 span edges, in order, with EAP-IG's sign (higher = more important).
  chosen = SC.select(scores, 5)
  SC.to_json(scores, path, edges=chosen)
  d = json.loads(path.read_text())
  lay = scores.layout
  assert list(d["edges"]) == [S.span_edge_name(lay, NAMES, *e[:4]) for e in chosen]
  assert list(d["edges"].values()) == [-e[4] for e in chosen]
  back = SC.from_json(path)
  assert np.count_nonzero(back.local) + np.count_nonzero(back.crossing) == 5
  assert [e[:4] for e in SC.select(back, 5)] == [e[:4] for e in chosen]
  SC.to_npz(scores, tmp_path / "spans.npz")
  back = SC.from_npz(tmp_path / "spans.npz")
  np.testing.assert_array_equal(back.crossing, loss.crossing)
  assert back.names == NAMES and back.schema == "test"
  # Bad names and files: one-line GraphErrors naming them.
  d["edges"] = {"a0.h0@a->m1@b": 1.0}
  path.write_text(json.dumps(d))
  with pytest.raises(GraphError, match="non-crossing edges stay within a span"):
    SC.from_json(path)
  d["edges"] = {"a0.h0@z->m1@z": 1.0}
  path.write_text(json.dumps(d))
  with pytest.raises(GraphError, match="'a0.h0@z->m1@z' is not a span edge"):
    SC.from_json(path)
  (tmp_path / "x.json").write_text("{}")
  with pytest.raises(GraphError, match="not a jaxinterp-span-scores file"):
    SC.from_json(tmp_path / "x.json")


def test_select_ranks_and_masks():
  scores = _span_scores(np.random.default_rng(1))
  n = SC.n_edges(scores)
  assert n == int(sum(m.sum() for m in SC.edge_masks(SHAPE, 3)))
  for absolute in (True, False):
    ranks = SC.selection_ranks(scores, absolute)
    for k in (0, 1, 7, n):
      masks = SC.circuit_masks(SHAPE, 3, SC.select(scores, k, absolute))
      for m, r in zip(masks, ranks, strict=True):
        np.testing.assert_array_equal(m, (r < k).astype(np.float32))
  with pytest.raises(GraphError, match="stay within a span"):
    SC.circuit_masks(SHAPE, 3, [(0, 0, scores.layout.receiver_index["logits"], 1)])


@pytest.mark.parametrize("how", S.AGGREGATIONS)
def test_row_masks_invert_the_aggregation(how):
  """Over a row with an empty span and uncovered positions, the position edges a span circuit
  covers are exactly those aggregated into its edges: the sum of a row's position scores over the
  covered edges is the sum of its `sum`-aggregated span scores over the circuit, and each span
  edge covers a non-empty group exactly when it has positions."""
  rng = np.random.default_rng(2)
  row = _scores(rng, 7)
  spans = np.array([[1, 3], [3, 3], [4, 6]])  # b empty; positions 0 and 3, 6 in no span
  local, crossing = SC.edge_masks(SHAPE, 3)
  m_local = (rng.random(local.shape) < 0.5) * local
  m_cross = (rng.random(crossing.shape) < 0.5) * crossing
  p_local, p_cross = SC.row_masks(m_local, m_cross, spans, 7)
  agg_local, agg_cross = S.aggregate_row(row, spans, "sum")
  want = (agg_local * m_local).sum() + (agg_cross * m_cross).sum()
  got = (row.local * p_local).astype(np.float64).sum() + (row.crossing * p_cross).sum()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Every span edge in: exactly the position edges inside covered positions.
  p_local, p_cross = SC.row_masks(*(m.astype(np.float32) for m in (local, crossing)), spans, 7)
  v_local, v_cross = cpos.edge_masks(SHAPE, 7)
  own = SC.owners(spans[None], 7)[0]
  qi, kj = cpos.pairs(7)
  np.testing.assert_array_equal(p_local, v_local * (own >= 0)[:, None, None])
  np.testing.assert_array_equal(p_cross, v_cross * ((own[qi] >= 0) & (own[kj] >= 0))[:, None,
                                                                                     None])
  # A span edge's aggregated value (any aggregation) comes from the positions it covers.
  agg_local, _ = S.aggregate_row(row, spans, how)
  lay = row.layout
  s, r = 0, lay.receiver_index["logits"]
  one = np.zeros_like(local, np.float32)
  one[2, s, r] = 1
  p_local, _ = SC.row_masks(one, np.zeros_like(crossing, np.float32), spans, 7)
  covered = row.local[p_local[:, s, r] == 1, s, r]
  assert np.flatnonzero(p_local[:, s, r]).tolist() == [4, 5]
  expect = {"sum": covered.sum(), "mean": covered.mean(),
            "max_abs": covered[np.argmax(np.abs(covered))]}[how]
  np.testing.assert_allclose(agg_local[2, s, r], expect, rtol=1e-6)


@pytest.fixture(scope="module")
def toy_setup():
  model = toy.load_toy()
  ds = _mixed_induction(2)  # rows of two layouts: blocks of 12 and 16 tokens
  spans = S.dataset_spans(S.induction_schema(), ds)
  return model, ds, spans


def test_forward_identities_on_the_bundled_model(toy_setup):
  """Every span edge in = the clean metric (all position edges in); none = the ablated one; a
  random span circuit over rows of two layouts = the mean of each row evaluated alone with its own
  position masks (`row_masks`), through the shared-mask forward."""
  model, ds, spans = toy_setup
  n_pos = ds.clean.shape[1]
  local, crossing = (m.astype(np.float32) for m in SC.edge_masks(model.cfg, 6))
  rng = np.random.default_rng(3)
  rand = ((rng.random(local.shape) < 0.3) * local, (rng.random(crossing.shape) < 0.3) * crossing)
  got = PC.evaluate_span_circuits(model.cfg, model.params, ds,
                                  [(local, crossing), (0 * local, 0 * crossing), rand], spans,
                                  batch_size=3, quiet=True)  # a padded final batch
  full = tuple(m.astype(np.float32) for m in cpos.edge_masks(model.cfg, n_pos))
  ref = PC.evaluate_position_circuits(model.cfg, model.params, ds,
                                      [full, tuple(0 * m for m in full)], batch_size=3, quiet=True)
  per_row = []
  for r in range(len(ds)):
    one = dataclasses.replace(ds, clean=ds.clean[r:r + 1], corrupted=ds.corrupted[r:r + 1],
                              lengths=ds.lengths[r:r + 1],
                              labels={k: v[r:r + 1] for k, v in ds.labels.items()})
    per_row.append(PC.evaluate_position_circuits(
        model.cfg, model.params, one, [SC.row_masks(*rand, spans[r], n_pos)], batch_size=1,
        quiet=True, ablation=A.make_ablation(model.cfg, model.params, ds, "patching", 3))[0])
  scale = abs(ref[0])
  assert abs(got[0] - ref[0]) <= 1e-5 * scale and abs(got[1] - ref[1]) <= 1e-5 * scale
  assert abs(got[2] - np.mean(per_row)) <= 1e-5 * scale, (got[2], np.mean(per_row))
  assert ref[0] - ref[1] > 1 and len({tuple(s[3]) for s in spans}) == 2


@pytest.mark.slow
def test_single_position_spans_equal_the_position_circuit(toy_setup):
  """The top-40 position circuit's edges between the induction schema's single-position spans
  (bos, first_A, after_first_A, last; every row shares one layout) as a span circuit: the same
  metric as that position circuit."""
  model, _, _ = toy_setup
  ds = toy.induction_task_dataset(8, seed=0)
  spans = S.dataset_spans(S.induction_schema(), ds)
  assert (spans == spans[:1]).all()
  scores = P.attribute_positions(model.cfg, model.params, ds, "EAP-IG-inputs", batch_size=8,
                                 quiet=True, ig_steps=3).scores
  single = {int(a): k for k, (a, b) in enumerate(spans[0]) if b - a == 1}
  kept = [e for e in scores.select(40) if e[1] in single and e[3] in single]
  assert len(kept) >= 5
  pos_masks = cpos.circuit_masks(model.cfg, scores.n_pos, kept)
  span_masks = SC.circuit_masks(model.cfg, 6, [(s, single[a], r, single[b])
                                               for s, a, r, b, _ in kept])
  np.testing.assert_array_equal(SC.row_masks(*span_masks, spans[0], scores.n_pos)[0],
                                pos_masks[0])
  want = PC.evaluate_position_circuits(model.cfg, model.params, ds, [pos_masks], batch_size=8,
                                       quiet=True)[0]
  got = PC.evaluate_span_circuits(model.cfg, model.params, ds, [span_masks], spans, batch_size=8,
                                  quiet=True)[0]
  assert abs(got - want) <= 1e-5 * abs(want), (got, want)
