"""Position-level edge scores: summed over positions they are the edge scores; an exact crossing
edge is a rerun with one query's key/value patched; the bundled model's K-composition position."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import positions as P
from jaxinterp.attribution import positions_exact as PX
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.groundtruth import toy
from jaxinterp.models import edges as E
from jaxinterp.models.transformer import sender_outputs
from jaxinterp.tasks import metrics as task_metrics
from tests.attribution.test_receiver_grads import CONFIGS, _params
from tests.models import test_family_methods
from tests.models.test_families import NEW

ALPHAS = {"EAP": [1.0], "EAP-IG-inputs": list(A.ig_alphas(3)), "clean-corrupted": [0.0, 1.0],
          "EAP-IG-activations": list(A.ig_alphas(2, eap_start=1))}
INTERPOLATE = {m: "activations" if m == "EAP-IG-activations" else "inputs" for m in ALPHAS}


def _data(cfg, n=6):
  ds = tasks.make_induction(n, 4, cfg.d_vocab, seed=0, bos_id=0)
  return ds, next(ds.batches(8, bucket=None))  # 2 filler rows: they must not count


def _check_sum(cfg, loc, cr, ref):
  ps = cpos.PositionScores(cfg, np.asarray(loc), np.asarray(cr))
  valid = valid_edges(cfg)
  got, ref = ps.edge_scores(), np.asarray(ref, np.float64)
  assert np.abs(ref[valid]).max() > 1e-2  # a real signal
  assert np.all(got[~valid] == 0)
  np.testing.assert_allclose(got[valid], ref[valid], atol=2e-5 * np.abs(ref).max(), rtol=1e-4)
  # Crossing edges only where the key precedes (or is) the query, and only k/v receivers there.
  kv = cpos.kv_receivers(cfg)
  assert np.all(np.asarray(loc)[:, :, kv] == 0)
  assert np.abs(np.asarray(cr)).max() > 0


_CASES = [("gpt2", m) for m in ALPHAS] + [(f, m) for f in ("llama", "gpt_neox", "gemma2")
                                         for m in ("EAP-IG-inputs", "EAP-IG-activations")]


def _marks(family: str, method: str) -> tuple:
  """GPT-2 EAP-IG-inputs in the fast suite; GPT-2's other methods and Llama's EAP-IG-inputs in
  the slow one; the other family cases in the by-hand family matrix (pyproject.toml)."""
  if (family, method) == ("gpt2", "EAP-IG-inputs"):
    return ()
  if family == "gpt2" or (family, method) == ("llama", "EAP-IG-inputs"):
    return (pytest.mark.slow,)
  return (pytest.mark.slow, pytest.mark.families_matrix)


@pytest.mark.parametrize("family,method", [pytest.param(f, m, marks=_marks(f, m))
                                           for f, m in _CASES])
def test_sum_over_positions_is_edge_score(family, method):
  cfg = CONFIGS[family]
  params = _params(cfg)
  ds, batch = _data(cfg)
  abl = A.Patching()
  alphas = jnp.asarray(ALPHAS[method], jnp.float32)
  loc, cr, _ = P.gradient_batch(cfg, ds.task, params, batch, abl, alphas,
                                interpolate=INTERPOLATE[method], chunk=2)
  if method == "EAP-IG-activations":
    ref, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas,
                                   interpolate="activations")
  else:
    ref, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas)
  _check_sum(cfg, loc, cr, ref)


@pytest.mark.slow
def test_attribute_positions_matches_attribute_mean_ablation():
  cfg = CONFIGS["llama"]
  params = _params(cfg)
  ds, _ = _data(cfg, n=5)
  got = P.attribute_positions(cfg, params, ds, "EAP", intervention="mean", batch_size=4,
                              quiet=True)
  ref = A.attribute(cfg, params, ds, "EAP", intervention="mean", batch_size=4, quiet=True)
  valid = valid_edges(cfg)
  np.testing.assert_allclose(got.scores.edge_scores()[valid], ref.scores[valid],
                             atol=2e-5 * np.abs(ref.scores).max(), rtol=1e-4)
  assert got.n_examples == 5 and got.clean_metric == pytest.approx(ref.clean_metric, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method,intervention", [
    ("EAP-IG-inputs", "patching"), ("EAP-IG-activations", "patching"),
    ("EAP-IG-activations", "zero"), ("clean-corrupted", "patching"), ("EAP", "zero-all"),
    ("EAP-IG-activations", "zero-all")])
def test_attribute_positions_matches_attribute(method, intervention):
  """`attribute_positions` takes each method's alphas and interpolation from its registry entry
  (`eap.EdgeKernel`): summed over positions, its scores are `attribute`'s for the same options
  (EAP-IG-inputs' k starting at 0, EAP-IG-activations' at 1; under zero ablation its layer nodes
  start from zero in both; under zero-all the position embedding too)."""
  model = toy.load_toy()
  ds = toy.induction_task_dataset(6, seed=0)
  options = {"ig_steps": 3} if method.startswith("EAP-IG") else {}
  got = P.attribute_positions(model.cfg, model.params, ds, method, batch_size=4, quiet=True,
                              intervention=intervention, **options)
  ref = A.attribute(model.cfg, model.params, ds, method, batch_size=4, quiet=True,
                    intervention=intervention, **options)
  valid = valid_edges(model.cfg)
  np.testing.assert_allclose(got.scores.edge_scores()[valid], ref.scores[valid],
                             atol=2e-5 * np.abs(ref.scores).max(), rtol=1e-4)
  assert got.n_examples == 6 and got.clean_metric == pytest.approx(ref.clean_metric, rel=1e-5)


def _independent_crossing(cfg, task, params, batch, layer, head, kind, sender, j, i):
  """m(only query i reads sender's ablated value in head's k/v input at j) - m(clean), by two full
  forwards with site interventions: one with the k/v input moved for every query, then the clean
  run with query i's row of that head's pattern (k) or z (v) taken from it."""
  clean = sender_outputs(cfg, params, batch.clean, batch.mask)
  corrupt = sender_outputs(cfg, params, batch.corrupted, batch.mask)
  d = (clean - corrupt)[:, j, sender]  # [b, d_model]
  pre = f"blocks.{layer}."
  site = pre + ("attn.hook_pattern" if kind == "k" else "attn.hook_z")

  def move(x):
    return x.at[:, j, head].add(-d.astype(x.dtype))

  _, moved = models.forward(cfg, params, batch.clean, attention_mask=batch.mask,
                            interventions={pre + f"hook_{kind}_input": move}, collect=(site,))
  new = moved[site]

  def put(x):
    if kind == "k":  # [b, head, query, key]
      return x.at[:, head, i].set(new[:, head, i])
    return x.at[:, i, head].set(new[:, i, head])  # [b, query, head, d_head]

  logits = models.forward(cfg, params, batch.clean, attention_mask=batch.mask)
  patched = models.forward(cfg, params, batch.clean, attention_mask=batch.mask,
                           interventions={site: put})
  m0, _ = task_metrics.metric_sum(task, logits, batch, logits)
  m1, _ = task_metrics.metric_sum(task, patched, batch, logits)
  return float(m1 - m0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exact_crossing_edge_is_a_one_query_rerun(family):
  cfg = CONFIGS[family]
  params = _params(cfg, 2.0)
  ds, batch = _data(cfg)
  abl = A.Patching()
  resids, _, delta, _ = A.exact.upstream_cache(cfg, params, batch, abl)
  c_total, _, _ = task_metrics.clean_metric(cfg, ds.task, params, batch)
  s = E.head_sender(cfg, 0, 1)
  # In the last layer only the last query (7) reaches the metric; in layer 0 every query may.
  cases = {1: [(s, 3, 2, 0, 7), (s, 4, 2, 1, 7), (0, 2, 1, 0, 7)], 0: [(0, 2, 1, 0, 5),
                                                                      (0, 3, 3, 1, 4)]}
  got, want = [], []
  for layer, edges in cases.items():
    vals = PX.crossing_chunk(cfg, ds.task, layer, params, batch, resids[layer], delta,
                             jnp.asarray(edges, jnp.int32), None)
    got += list(np.asarray(vals, np.float64) - float(c_total))
    want += [_independent_crossing(cfg, ds.task, params, batch, layer, h, "kv"[k], s_, j, i)
             for s_, j, h, k, i in edges]
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max() + 1e-6, rtol=1e-3)


@pytest.mark.slow
def test_exact_positions_where_exact_is_additive():
  """Exact scores are not additive over positions, but where one position carries the whole
  difference they sum to the edge-level exact scores: `input` edges when clean and corrupted differ
  in one token (except k/v inputs before the last layer, read by several queries), and the logits
  edges (only the last position is read). The packed crossing entries are the one-query reruns."""
  cfg = CONFIGS["gpt2"]
  params = _params(cfg, 2.0)
  ds, _ = _data(cfg, n=4)
  corrupted = ds.clean.copy()
  corrupted[:, 2] = (corrupted[:, 2] + 7) % cfg.d_vocab
  ds = dataclasses.replace(ds, corrupted=corrupted)
  pos = P.attribute_positions(cfg, params, ds, "exact", batch_size=4, quiet=True).scores
  edge = A.attribute(cfg, params, ds, "exact", batch_size=4, quiet=True).scores
  summed = pos.edge_scores()
  L, H = cfg.n_layers, cfg.n_heads
  early_kv = [E.head_receiver(cfg, li, h, x) for li in range(L - 1) for h in range(H)
              for x in "kv"]
  cols = np.setdiff1d(np.flatnonzero(valid_edges(cfg)[0]), early_kv)
  scale = np.abs(edge).max()
  np.testing.assert_allclose(summed[0, cols], edge[0, cols], atol=1e-4 * scale, rtol=1e-3)
  lg = E.logits_receiver(cfg)
  np.testing.assert_allclose(summed[:, lg], edge[:, lg], atol=1e-4 * scale, rtol=1e-3)
  # one packed crossing entry against its independent rerun
  batch = next(ds.batches(4, bucket=None))
  s, j, i, h = E.head_sender(cfg, 0, 2), 2, 7, 1
  want = _independent_crossing(cfg, ds.task, params, batch, 1, h, "k", s, j, i) / 4
  c = list(cpos.kv_receivers(cfg)).index(E.head_receiver(cfg, 1, h, "k"))
  assert pos.crossing[cpos.pair_index(i, j), s, c] == pytest.approx(want, rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_bundled_model_k_composition_position():
  """Position-level EAP-IG on the bundled induction model: the top edge into a1.h0<k> comes from
  a0.h3 at the position right after the earlier occurrence of the final token."""
  model = toy.load_toy()
  ds = toy.induction_task_dataset(16, seed=0)
  res = P.attribute_positions(model.cfg, model.params, ds, "EAP-IG-inputs", batch_size=16,
                              quiet=True)
  clean = ds.clean
  last = clean.shape[1] - 1
  earlier = [int(np.flatnonzero(row[:last] == row[last])[0]) for row in clean]
  assert len(set(earlier)) == 1  # one layout for every row
  top = res.scores.top(1, "a1.h0<k>")[0][0]
  assert top == f"a0.h3@{earlier[0] + 1}->a1.h0<k>@{last}", top


@pytest.mark.slow
@pytest.mark.parametrize("route", ["direct", "y"])
def test_contraction_routes_agree(route):
  """Both ways of contracting the rank-one crossing scores give the edge score (gpt2: k and v)."""
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  ds, batch = _data(cfg)
  abl = A.Patching()
  alphas = jnp.asarray(ALPHAS["EAP"], jnp.float32)
  # chunk 2 as the gpt2 EAP case above: its program ("auto" is "y" at this size) is compiled once
  loc, cr, _ = P.gradient_batch(cfg, ds.task, params, batch, abl, alphas, chunk=2,
                                route=route)
  ref, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas)
  _check_sum(cfg, loc, cr, ref)


@pytest.mark.slow
@pytest.mark.families_matrix  # by hand: see pyproject.toml
@pytest.mark.parametrize("qk_norm,rotary", [("head", True), ("all", False)])
def test_sum_over_positions_with_qk_norm(qk_norm, rotary):
  """The k gradients split by query go back through qk-norm (and rotary): Qwen3/Gemma-3 style."""
  cfg = dataclasses.replace(CONFIGS["llama"], qk_norm=qk_norm,
                            **({} if rotary else {"positional": "learned", "rotary_dim": None}))
  params = _params(cfg)
  ds, batch = _data(cfg)
  abl = A.Patching()
  alphas = jnp.asarray(ALPHAS["EAP-IG-inputs"], jnp.float32)
  loc, cr, _ = P.gradient_batch(cfg, ds.task, params, batch, abl, alphas, chunk=4)
  ref, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas)
  _check_sum(cfg, loc, cr, ref)


# ------------------------------------------ every family, tiny: the identities of the matrix above

# The families beyond GPT-2 and Llama at the smallest size that keeps what makes each one itself
# (GQA, post-norms, qk-norm, soft-caps, sliding windows, parallel blocks, RoPE types):
# 2 layers, 2 heads (1 key/value head where the family groups them), d_model 16.
_TINY_FAMILIES = ("gpt_neox", "gemma2") + NEW


def _tiny(family: str) -> models.ModelConfig:
  cfg = CONFIGS[family] if family in CONFIGS else test_family_methods.CONFIGS[family]
  return dataclasses.replace(cfg, d_model=16, n_heads=2, d_mlp=32,
                             n_kv_heads=1 if cfg.n_kv_heads else None)


def _tiny_params(cfg):
  """Random params, weights scaled up (scores far from rounding noise) and norms and biases
  perturbed (non-trivial norms)."""
  rng = np.random.RandomState(2)
  return jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else
                      x + 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                      models.init_params(cfg, jax.random.PRNGKey(1)))


def _tiny_case(family: str):
  cfg = _tiny(family)
  ds = tasks.make_induction(2, 3, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(ds.batches(3, bucket=None))  # a filler row: it must not count
  return cfg, ds, batch, A.Patching(), _tiny_params(cfg)


# In CI: OLMo-2 (no block input norms: the case that once found a kernel bug); the others by
# hand (CI's time budget).
_CI_FAMILIES = ("olmo2",)


def _families(*marks, by_hand=False):
  return [pytest.param(f, marks=[*marks, *([pytest.mark.families_matrix]
                                         if by_hand or f not in _CI_FAMILIES else [])])
          for f in _TINY_FAMILIES]


@pytest.mark.parametrize("family", _families(pytest.mark.slow, by_hand=True))
def test_position_identities_of_every_family_activations(family):
  """EAP-IG-activations' identity of the test below (its own two kernels compile for ~20 s per
  family: by hand, CI's time budget)."""
  cfg, ds, batch, abl, params = _tiny_case(family)
  a = jnp.asarray(A.ig_alphas(2, eap_start=1), jnp.float32)
  loc, cr, _ = P.gradient_batch(cfg, ds.task, params, batch, abl, a, interpolate="activations",
                                chunk=3)
  ref, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, a, interpolate="activations")
  _check_sum(cfg, loc, cr, ref)


@pytest.mark.parametrize("family", _families(pytest.mark.slow))
def test_position_identities_of_every_family(family):
  """The by-hand matrix's identities on a tiny model of each family (2 rows of 6 tokens and a
  filler row, 2 IG steps): summed over positions, the scores of EAP, EAP-IG-inputs and
  clean-corrupted are their edge scores (EAP-IG-activations': the test above), and exact
  crossing edges (k and v into the last layer, k into the first, inside every sliding window) are
  one-query reruns."""
  cfg, ds, batch, abl, params = _tiny_case(family)
  # EAP as two equal steps at alpha = 1 (their mean is EAP's one step), so that the three methods
  # that interpolate the inputs run one program.
  alphas = {"EAP": [1.0, 1.0], "EAP-IG-inputs": list(A.ig_alphas(2)),
            "clean-corrupted": [0.0, 1.0]}
  for a in alphas.values():
    a = jnp.asarray(a, jnp.float32)
    loc, cr, _ = P.gradient_batch(cfg, ds.task, params, batch, abl, a, chunk=3)
    ref, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, a)
    _check_sum(cfg, loc, cr, ref)
  # Exact crossing edges (sender, key j, head, 0 k / 1 v, query i): k and v in the last layer,
  # where only the last query (5) reaches the metric, and k in layer 0. Clean and corrupted differ
  # at positions 1-3; every key here is inside the query's window (3 positions).
  resids, _, delta, _ = A.exact.upstream_cache(cfg, params, batch, abl)
  c_total, _, _ = task_metrics.clean_metric(cfg, ds.task, params, batch)
  # (The v edge from a0.h1 and the k edge 3 -> 4 of layer 0 give OLMo-2's tiny model a signal: its
  # other three edges here move the metric by less than 2e-5.)
  s01 = E.head_sender(cfg, 0, 1)
  cases = {1: [(s01, 4, 0, 0, 5), (0, 3, 1, 1, 5), (s01, 4, 0, 1, 5)],
           0: [(0, 2, 1, 0, 3), (0, 3, 1, 0, 4)]}
  got, want = [], []
  for layer, edges in cases.items():
    vals = PX.crossing_chunk(cfg, ds.task, layer, params, batch, resids[layer], delta,
                             jnp.asarray(edges, jnp.int32), None)
    got += list(np.asarray(vals, np.float64) - float(c_total))
    want += [_independent_crossing(cfg, ds.task, params, batch, layer, h, "kv"[k], s_, j, i)
             for s_, j, h, k, i in edges]
  assert np.abs(want).max() > 1e-3  # a real signal
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max() + 1e-6, rtol=1e-3)
