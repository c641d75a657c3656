"""Position-level edge names, index <-> name, and the .npz / JSON round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits.layout import GraphError, GraphShape, layout_for, shape_key
from jaxinterp.models import edges as E

SHAPE = GraphShape(2, 3)


def _random_scores(n_pos=5, seed=0):
  lay = layout_for(shape_key(SHAPE))
  rng = np.random.default_rng(seed)
  kv = cpos.kv_receivers(SHAPE)
  local = rng.normal(size=(n_pos, lay.n_senders, lay.n_receivers)).astype(np.float32)
  local = np.where(lay.valid[None], local, 0.0).astype(np.float32)
  local[:, :, kv] = 0.0
  cross = rng.normal(size=(n_pos * (n_pos + 1) // 2, lay.n_senders, kv.size)).astype(np.float32)
  cross = np.where(lay.valid[:, kv][None], cross, 0.0).astype(np.float32)
  cross[3] = 0.0  # a zero pair stays zero
  return cpos.PositionScores(SHAPE, local, cross)


def test_names_round_trip():
  lay = layout_for(shape_key(SHAPE))
  s, r = E.head_sender(SHAPE, 0, 2), E.head_receiver(SHAPE, 1, 0, "k")
  name = cpos.edge_name(lay, s, 5, r, 9)
  assert name == "a0.h2@5->a1.h0<k>@9"
  assert cpos.parse_edge_name(lay, name) == (s, 5, r, 9)
  assert cpos.edge_name(lay, 0, 3, E.mlp_receiver(SHAPE, 0), 3) == "input@3->m0@3"
  for bad in ("a0.h2@9->a1.h0<k>@5",  # key after query
              "a0.h2@5->a1.h0<q>@9",  # q edges stay at one position
              "a1.h0@2->a0.h1<v>@2",  # not an edge
              "a0.h2->a1.h0<k>", "a0.h2@x->m1@x"):
    with pytest.raises(GraphError, match="position edge|not an edge"):
      cpos.parse_edge_name(lay, bad)


def test_pairs_are_packed_lower_triangle():
  qi, kj = cpos.pairs(4)
  assert len(qi) == 10 and np.all(kj <= qi)
  np.testing.assert_array_equal(cpos.pair_index(qi, kj), np.arange(10))


def test_entries_sum_and_top():
  sc = _random_scores()
  total = sum(v for *_, v in sc.entries())
  assert total == pytest.approx(sc.edge_scores().sum(), rel=1e-6)
  (name, v), = sc.top(1, "a1.h0<k>")
  assert name.endswith("->a1.h0<k>@" + name.rsplit("@", 1)[1])
  kv = list(cpos.kv_receivers(SHAPE)).index(E.head_receiver(SHAPE, 1, 0, "k"))
  assert v == pytest.approx(sc.crossing[:, :, kv].min())  # metric convention: most negative
  with pytest.raises(GraphError, match="not a receiver"):
    sc.top(1, "a9.h0<k>")


@pytest.mark.parametrize("fmt", ["npz", "json"])
def test_file_round_trip(tmp_path, fmt):
  sc = _random_scores()
  path = tmp_path / f"scores.{fmt}"
  getattr(cpos, f"to_{fmt}")(sc, path)
  back = getattr(cpos, f"from_{fmt}")(path)
  assert back.convention == "loss"
  np.testing.assert_array_equal(back.local, -sc.local + 0.0)
  again = back.with_convention("metric")
  np.testing.assert_array_equal(again.local, sc.local)
  np.testing.assert_array_equal(again.crossing, sc.crossing)
  assert again.local.dtype == np.float32


def test_bad_file(tmp_path):
  path = tmp_path / "x.json"
  path.write_text('{"format": "something else"}')
  with pytest.raises(GraphError, match="is not a jaxinterp-position-scores file"):
    cpos.from_json(path)


@pytest.mark.parametrize("absolute", [True, False])
def test_select_is_a_nested_ranking_written_as_a_circuit(tmp_path, absolute):
  scores = _random_scores()
  v_local, v_cross = scores.valid()
  assert scores.n_edges == np.count_nonzero(v_local) + np.count_nonzero(v_cross)
  every = scores.select(scores.n_edges, absolute=absolute)
  assert len(every) == scores.n_edges and len(set(e[:4] for e in every)) == scores.n_edges
  key = [abs(e[4]) if absolute else -e[4] for e in every]  # metric sign: negative = important
  assert key == sorted(key, reverse=True)
  assert scores.select(7, absolute=absolute) == every[:7]  # nested
  # signed: the most negative score is the most important in the metric convention
  assert scores.select(1, absolute=False)[0][4] == min(e[4] for e in every)
  with pytest.raises(GraphError, match="top_n: n"):
    scores.select(scores.n_edges + 1)
  path = tmp_path / "circuit.json"
  cpos.to_json(scores, path, edges=every[:7], meta={"method": "EAP"})
  with open(path) as f:
    d = json.load(f)
  assert list(d["edges"]) == [n for n, _ in scores.names(every[:7])]  # best first
  assert d["meta"] == {"method": "EAP"}
  back = cpos.from_json(path)  # only the circuit's edges, in graph.json's (loss) sign
  got = dict(back.names(back.entries()))
  assert got == {n: -v for n, v in scores.names(every[:7])}  # metric -> loss
