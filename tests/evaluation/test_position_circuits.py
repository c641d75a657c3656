"""The position-circuit forward: all edges in is the clean model and none the ablated one; every
position instance of an edge circuit is that circuit; one position edge out of an otherwise complete
circuit is an independent rerun with that edge alone ablated (GPT-2- and Llama-shaped tiny models,
GQA and rotary); the bundled model's K-composition circuit; find_circuit writes the curve."""

from __future__ import annotations

import csv
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import positions_exact as PX
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits.layout import GraphError, valid_edges
from jaxinterp.discovery import FindCircuitConfig, find_circuit
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.evaluation import position_circuits as PC
from jaxinterp.groundtruth import toy
from jaxinterp.models import edges as E
from tests.attribution.test_receiver_grads import CONFIGS, _params


def _data(cfg, n=6):
  """Induction prompts of 8 tokens, two of them cut short (right padding: their metric position is
  not the last one), in a batch of 8 (2 filler rows: they must not count)."""
  ds = tasks.make_induction(n, 4, cfg.d_vocab, seed=0, bos_id=0)
  ds = dataclasses.replace(ds, lengths=np.where(np.arange(n) % 3 == 1, ds.lengths - 1,
                                                ds.lengths))
  return ds, next(ds.batches(8, bucket=None))


def _masks(cfg, n_pos, kind):
  full = tuple(m.astype(np.float32) for m in cpos.edge_masks(cfg, n_pos))
  return full if kind == "full" else tuple(np.zeros_like(m) for m in full)


def _without(cfg, n_pos, s, ps, r, pr):
  """Every position edge but one."""
  local, crossing = _masks(cfg, n_pos, "full")
  kv = list(cpos.kv_receivers(cfg))
  if r in kv:
    assert crossing[cpos.pair_index(pr, ps), s, kv.index(r)] == 1
    crossing[cpos.pair_index(pr, ps), s, kv.index(r)] = 0
  else:
    assert local[ps, s, r] == 1
    local[ps, s, r] = 0
  return local, crossing


@pytest.mark.parametrize("family", ["gpt2"] + [pytest.param(f, marks=pytest.mark.slow)
                                    for f in ("llama", "gpt_neox", "gemma2")])
def test_identities(family):
  """GPT-2 in the fast suite; Llama (GQA, rotary), NeoX (parallel blocks, partial rotary) and
  Gemma-2 (post-norms, soft-caps, sliding window) in the slow one."""
  cfg = CONFIGS[family]
  if family == "gemma2":  # a window of 6 of the 8 positions: the edges below reach the metric
    cfg = dataclasses.replace(cfg, sliding_window=6)
  params = _params(cfg)
  ds, batch = _data(cfg)
  p = batch.clean.shape[1]
  abl = A.Patching()
  fwd = PC.PositionCircuitForward(cfg, params, ds.task)
  prep = fwd.prepare(batch, abl)

  def metric(masks):
    return float(fwd.metric(batch, prep, *masks))

  # (1) every position edge in: the clean model; none: every sender ablated (the corrupted run),
  # as the edge-level circuit forward has them (its own tests hold them to plain forwards).
  ef = CF.CircuitForward(cfg, params, ds.task, valid_edges(cfg))
  eprep = ef.prepare(batch, abl)
  clean_total, corrupt_total = float(eprep.clean_total), float(eprep.empty_total)
  scale = max(abs(clean_total), abs(corrupt_total))  # float32 rounding is relative to this
  assert abs(clean_total - corrupt_total) > 0.1  # a real difference
  signal = 3e-4 * scale  # 30x the tolerance: what an edge set or an edge must move
  full, empty = metric(_masks(cfg, p, "full")), metric(_masks(cfg, p, "empty"))
  assert abs(full - clean_total) <= 1e-5 * scale, (full, clean_total)
  assert abs(empty - corrupt_total) <= 1e-5 * scale, (empty, corrupt_total)

  # (2) every position instance of an edge circuit: the edge-level circuit forward's metric.
  rng = np.random.RandomState(0)
  got, want = [], []
  for frac in (0.5, 0.9):
    w = (valid_edges(cfg) & (rng.rand(*valid_edges(cfg).shape) < frac)).astype(np.float32)
    got.append(metric(cpos.every_position(cfg, p, w)))
    want.append(float(ef.metric(batch, eprep, w)))
  assert abs(want[0] - want[1]) > signal and min(abs(np.subtract(want, empty))) > signal
  np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)

  # (3) one edge out of an otherwise complete circuit: the exact rerun with that edge alone
  # ablated (positions_exact's one-query reruns for crossing edges, exact's for local ones).
  resids, mlp_inputs, delta, _ = A.exact.upstream_cache(cfg, params, batch, abl)
  s = E.head_sender(cfg, 0, 1)
  cross = {1: [(s, 3, 2, 0, p - 1), (s, 4, 2, 1, p - 1), (0, 2, 1, 0, p - 1)],
           0: [(0, 2, 1, 0, p - 3), (0, 3, 3, 1, p - 4)]}  # (sender, j, head, k/v, i)
  got, want = [], []
  for layer, rows in cross.items():
    want += list(np.asarray(PX.crossing_chunk(cfg, ds.task, layer, params, batch, resids[layer],
                                              delta, jnp.asarray(rows, jnp.int32), None)))
    got += [metric(_without(cfg, p, s_, j, E.head_receiver(cfg, layer, h, "kv"[k]), i))
            for s_, j, h, k, i in rows]
  pos_ids = jnp.arange(p)[None, :, None, None]
  local = [(1, s, E.head_receiver(cfg, 1, 0, "q"), p - 1), (1, 0, E.head_receiver(cfg, 1, 2, "q"),
                                                             p - 1),
           (2, s, E.logits_receiver(cfg), p - 1)]  # (layer, sender, receiver, position)
  for layer in (1, 2):  # one compiled rerun per layer: every edge into it at its position
    rows = [(s_, r, pos) for li, s_, r, pos in local if li == layer]
    d_p = jnp.where(pos_ids == rows[0][2], delta, 0.0)
    assert all(pos == rows[0][2] for _, _, pos in rows)
    want += list(np.asarray(A.exact.edge_chunk(
        cfg, ds.task, layer, params, batch, resids[layer], mlp_inputs[1], d_p,
        jnp.asarray([s_ for s_, _, _ in rows], jnp.int32),
        jnp.asarray([r for _, r, _ in rows], jnp.int32), None)))
    got += [metric(_without(cfg, p, s_, pos, r, pos)) for s_, r, pos in rows]
  changes = np.subtract(want, clean_total)
  assert np.sort(np.abs(changes))[-3] > signal, changes  # the edges matter
  np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


def test_masks_and_refusals():
  cfg = CONFIGS["gpt2"]
  lay = cpos.layout_for(cpos.shape_key(cfg))
  scores = cpos.PositionScores(cfg, *(np.random.RandomState(0).randn(*m.shape).astype(np.float32)
                                      * m for m in cpos.edge_masks(cfg, 5)))
  ranks = cpos.selection_ranks(scores)
  for n in (0, 7, scores.n_edges):
    masks = cpos.circuit_masks(cfg, 5, scores.select(n))
    for m, r in zip(masks, ranks, strict=True):
      np.testing.assert_array_equal(m, (r < n).astype(np.float32))
  with pytest.raises(GraphError, match="is not a position edge"):
    s, _, r, _ = cpos.parse_edge_name(lay, "a0.h1@2->a1.h0<q>@2")
    cpos.circuit_masks(cfg, 5, [(s, 2, r, 3)])  # a local edge between two positions
  with pytest.raises(GraphError, match="5-position graph"):
    cpos.circuit_masks(cfg, 5, [cpos.parse_edge_name(lay, "a0.h1@2->a1.h0<k>@6")])
  ds, batch = _data(cfg)
  fwd = PC.PositionCircuitForward(cfg, _params(cfg), ds.task)
  with pytest.raises(A.AttributionError, match="a batch of 8 positions needs"):
    fwd.metric(batch, None, *_masks(cfg, 5, "full"))
  with pytest.raises(A.AttributionError, match="intervention=patching, zero"):
    PC.check(cfg, "optimal")
  with pytest.raises(A.AttributionError, match="need a causal model"):
    PC.check(models.ModelConfig(**{**cfg.to_dict(), "causal": False}), "patching")


def test_toy_k_composition_circuit():
  """The bundled model's circuit of docs/methods.md, `input@15->a0.h3<v>@16`,
  `a0.h3@16->a1.h0<k>@31`, `a1.h0@31->logits@31`, keeps none of the metric by itself (measured
  faithfulness -0.026 on 16 prompts): the corrupted prompts change the first half, so the value
  a1.h0 copies at key 16 (r_16, the answer) is the corrupted token. With that value edge,
  `input@16->a1.h0<v>@31`, it keeps 0.327."""
  m, ds = toy.load_toy(), toy.induction_task_dataset(16)
  p = ds.clean.shape[1]
  lay = cpos.layout_for(cpos.shape_key(m.cfg))
  names = ["input@15->a0.h3<v>@16", "a0.h3@16->a1.h0<k>@31", "a1.h0@31->logits@31"]
  circuits = [_masks(m.cfg, p, "full"), _masks(m.cfg, p, "empty")] + [
      cpos.circuit_masks(m.cfg, p, [cpos.parse_edge_name(lay, n) for n in ns])
      for ns in (names, names + ["input@16->a1.h0<v>@31"])]
  vals = PC.evaluate_position_circuits(m.cfg, m.params, ds, circuits, batch_size=16, quiet=True)
  np.testing.assert_allclose(vals[:2], [11.9072, 0.3175], atol=1e-3)  # V.baselines's
  faith = (vals[2:] - vals[1]) / (vals[0] - vals[1])
  assert -0.1 < faith[0] < 0.05, faith
  assert 0.27 < faith[1] < 0.39, faith


@pytest.mark.slow
def test_find_circuit_writes_the_position_curve(tmp_path):
  out = str(tmp_path / "run")
  config = FindCircuitConfig(model="toy", method="EAP-IG-inputs", n_examples=8, batch_size=8,
                             top_n=20, options={"level": "position"})
  summary = find_circuit(config, out)
  with open(os.path.join(out, "faithfulness.csv")) as f:
    rows = list(csv.DictReader(f))
  assert os.path.getsize(os.path.join(out, "faithfulness.png")) > 10_000
  sizes = [int(r["n_edges"]) for r in rows]
  assert sizes[0] == 0 and 20 in sizes and sizes[-1] == summary["n_position_edges"]
  faith = {int(r["n_edges"]): float(r["faithfulness"]) for r in rows}
  assert faith[0] == 0.0 and faith[sizes[-1]] == 1.0
  assert summary["faithfulness"] == pytest.approx(faith[20]) and 0.7 < faith[20] < 0.95
  # the top-20 circuit, evaluated on its own from graph.json, is the curve's point
  scores = cpos.from_npz(os.path.join(out, "positions.npz"))
  masks = cpos.circuit_masks(scores.shape, scores.n_pos, scores.select(20))
  ds = toy.induction_task_dataset(8, seed=0)
  m = toy.load_toy()
  got = PC.evaluate_position_circuits(m.cfg, m.params, ds, [masks], batch_size=8, quiet=True)[0]
  assert got == pytest.approx(float(rows[sizes.index(20)]["metric"]), rel=1e-6)
  # MIB's CPR and CMD over the position edges (measured 0.980 and 0.0006)
  mib = PC.mib_scores(m.cfg, m.params, ds, scores, batch_size=8)
  assert 0.9 < mib["CPR"] < 1.05 and 0 <= mib["CMD"] < 0.02, mib
