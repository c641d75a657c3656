"""The circuit forward (only the nodes a circuit reads) equals the graph-form reference evaluation.

Faithfulness is compared to 1e-5 (relative when |f| > 1; in float32 plus two ulps of the metric
over m(full) - m(empty)) for GPT-2, NeoX (parallel blocks), Llama (GQA) and Gemma-2 (post-norms,
softcaps, sliding window), with every ablation, on circuits of every kind: empty, full, single
heads, sparse and dense random ones, pruned top-n ones and fractional weights.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import circuits as G
from jaxinterp import models, tasks
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.models import edges as E
from jaxinterp.models.transformer import stack_blocks
from jaxinterp.runtime import shared_prefix
from tests.attribution.test_receiver_grads import CONFIGS, _params
from tests.runtime.test_shared_prefix import late_corruption


def _circuits(cfg, seed=0):
  """A [C, S, R] stack: full, empty, one head read by the logits, the input read by one MLP,
  random circuits from 1% to 80% dense, fractional weights and pruned top-n circuits."""
  g = G.Graph.from_config(cfg)
  rng = np.random.default_rng(seed)
  out = [g.full().edge_weights(), g.empty().edge_weights()]
  w = g.empty().edge_weights()
  w[E.head_sender(cfg, 1, 2), E.logits_receiver(cfg)] = 1
  out.append(w)
  w = g.empty().edge_weights()
  w[0, E.mlp_receiver(cfg, 0)] = 1
  w[E.mlp_sender(cfg, 0), E.logits_receiver(cfg)] = 1
  out.append(w)
  out += [((rng.random(g.valid.shape) < d) & g.valid).astype(np.float32)
          for d in (0.01, 0.05, 0.2, 0.5, 0.8)]
  out.append(rng.random(g.valid.shape).astype(np.float32) * g.valid)  # fractional weights
  scored = G.Graph.from_config(cfg, rng.standard_normal(g.valid.shape) * g.valid)
  out += [scored.top_n(n).edge_weights() for n in (3, 12, 40)]
  return np.stack(out).astype(np.float32)


def _ablation(cfg, params, data, kind):
  if kind == "optimal":  # learned constants: any [sender, d_model] values exercise the path
    key = jax.random.PRNGKey(3)
    return A.Optimal(jax.random.normal(key, (E.n_senders(cfg), cfg.d_model)))
  return A.make_ablation(cfg, params, data, kind, 4)


def _faithfulness(metric):
  return (metric - metric[1]) / (metric[0] - metric[1])


def _check(family, kind, x64=False):
  cfg = CONFIGS[family]
  assert CF.supported(cfg)
  params = _params(cfg)
  # 10 = 2 batches + 2 fillers; with patching, the last two batches run only their suffixes
  data = late_corruption(cfg)
  assert [shared_prefix.plan(cfg, b, kind) for b in data.batches(4)] == (
      [None, 8, 8] if kind == "patching" else [None] * 3)
  weights = _circuits(cfg)
  with jax.enable_x64(x64):
    if x64:
      params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    ablation = _ablation(cfg, params, data, kind)
    if x64:
      ablation = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), ablation)
    ref = V.evaluate_circuits(cfg, params, data, weights, batch_size=4, ablation=ablation,
                              quiet=True, reference=True)
    fast = V.evaluate_circuits(cfg, params, data, weights, batch_size=4, ablation=ablation,
                               quiet=True)
  assert np.abs(ref[0] - ref[1]) > 1e-3  # the full model and the empty circuit differ
  assert np.std(ref[2:]) > 1e-3  # and the circuits differ from each other
  f_fast, f_ref = _faithfulness(fast), _faithfulness(ref)
  # 1e-5, relative where a circuit overshoots (|f| > 1: float32 rounding scales with the metric),
  # plus two ulps of the metric in faithfulness units: the paths add the same terms in another
  # order, and a metric of 4.3 over a denominator of 0.044 (gpt2, patching) makes one ulp 1.1e-5.
  ulp = np.spacing(np.abs(np.asarray(ref, np.float32)).max()) if not x64 else 0.0
  bound = 1e-5 * np.maximum(1.0, np.abs(f_ref)) + 2 * ulp / abs(ref[0] - ref[1])
  assert np.all(np.abs(f_fast - f_ref) <= bound), (f_fast, f_ref, bound)
  np.testing.assert_allclose(fast, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("family,kind", [
    ("gpt2", "patching"),
    pytest.param("llama", "mean", marks=pytest.mark.slow),
    pytest.param("gemma2", "patching", marks=pytest.mark.slow)])
def test_circuit_forward_equals_the_graph_form(family, kind):
  """float32, on well-conditioned cases (the default run keeps one; CI's slow run the others)."""
  _check(family, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", A.INTERVENTIONS)
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2"])
def test_circuit_forward_equals_the_graph_form_everywhere(family, kind):
  """Every family x every ablation, in float64 (the two paths then agree to ~1e-8).

  In float32 some of these are ill-conditioned rather than wrong: with these random weights
  m(full) - m(empty) can be 0.005, which scales float32 rounding up to ~1e-4 of faithfulness; and
  for Gemma-2 with zero ablations (no bias, no learned positions) every ablated residual is exactly
  0, so the reference's RMSNorm scales its rounding residue (resid - sum of senders, ~1e-7) by
  1/sqrt(eps), while the circuit forward reads the exact 0. The float32 cases above are
  well-conditioned."""
  _check(family, kind, x64=True)


def test_unsupported_post_norms_use_the_reference():
  """LayerNorm post-norms (a head's share of the normed output is not its sender value plus a
  constant) are evaluated by the reference path, with the same results."""
  cfg = dataclasses.replace(CONFIGS["gemma2"], normalization="layernorm", rmsnorm_plus_one=False)
  assert not CF.supported(cfg)
  params = _params(cfg, scale=3.0)
  data = tasks.make_induction(4, 4, cfg.d_vocab, seed=0, bos_id=0)
  weights = _circuits(cfg)[:4]
  fast = V.evaluate_circuits(cfg, params, data, weights, batch_size=4, quiet=True)
  ref = V.evaluate_circuits(cfg, params, data, weights, batch_size=4, quiet=True, reference=True)
  np.testing.assert_array_equal(fast, ref)


def test_head_buckets():
  cfg = CONFIGS["gpt2"]
  assert CF.head_buckets(cfg) == (0, 4)
  assert CF.head_buckets(dataclasses.replace(cfg, n_heads=12)) == (0, 3, 12)
  assert CF.head_buckets(dataclasses.replace(cfg, n_heads=16)) == (0, 4, 16)
  assert CF.head_buckets(CONFIGS["gemma2"]) == (0, 4)  # post-norms: all heads or none


@pytest.mark.slow
def test_sparse_and_dense_reads_agree_with_the_reference():
  """A wide config (16 heads, 3 layers) where layers read more than `SPARSE_ROWS` upstream senders:
  small circuits take the gathered-rows read, dense ones the full product."""
  cfg = models.ModelConfig(family="gpt2", d_model=32, n_layers=3, n_heads=16, d_head=4, d_mlp=64,
                           d_vocab=50, n_ctx=32)
  assert E.n_upstream_of_attn(cfg, 2) > 2 * CF.SPARSE_ROWS
  params = _params(cfg)
  data = tasks.make_induction(8, 4, cfg.d_vocab, seed=0, bos_id=0)
  weights = _circuits(cfg)
  ref = V.evaluate_circuits(cfg, params, data, weights, batch_size=4, quiet=True, reference=True)
  fast = V.evaluate_circuits(cfg, params, data, weights, batch_size=4, quiet=True)
  np.testing.assert_allclose(fast, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)


def test_compile_ahead_leaves_nothing_to_compile():
  """`evaluation.compile_ahead` (find_circuit runs it during attribution) compiles prepare and the
  circuit metric for every batch shape in a thread, so the evaluation that follows compiles neither;
  the circuit metric's reused buffer leaves repeated evaluations unchanged. Ablations that need a
  pass over the data are not compiled ahead."""
  from jaxinterp.runtime.timing import CompileTimer
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  data = late_corruption(cfg)  # batches with and without a shared prefix: both are compiled
  weights = _circuits(cfg)[6:9]
  ablation = A.make_ablation(cfg, params, data, "patching", 4)
  assert V.compile_ahead(cfg, params, data, intervention="mean", batch_size=4) is None
  V.compile_ahead(cfg, params, data, intervention="patching", batch_size=4).join()
  fwd = CF.CircuitForward(cfg, params, data.task, valid_edges(cfg))
  for batch in list(data.batches(4))[:2]:
    with CompileTimer() as timer:
      prep = fwd.prepare(batch, ablation)
      first = [float(fwd.metric(batch, prep, w)) for w in weights]
      again = [float(fwd.metric(batch, prep, w)) for w in weights]
    # Only eager odds and ends compile (the buffer's zeros): the circuit metric alone takes seconds.
    assert timer.seconds < 0.3, timer.by_kind
    assert first == again and len(set(first)) == 3  # three different circuits, each reproduced


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+ = ")  # as benchmarks/compile.py counts


def _deep(n_layers):
  return models.ModelConfig(family="gpt2", d_model=16, n_layers=n_layers, n_heads=4, d_head=4,
                            d_mlp=32, d_vocab=50, n_ctx=32)


def _metric_lowered(cfg):
  """`circuit_metric` lowered as `CircuitForward` compiles it (abstract arguments: nothing runs)."""
  params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))
  data = tasks.make_induction(4, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(data.batches(4))
  fwd = CF.CircuitForward(cfg, params, data.task, valid_edges(cfg))
  prep = jax.eval_shape(lambda p, b, a: CF.prepare(fwd.cfg, fwd.task, p, b, a), fwd.params,
                        batch, A.Patching())
  w = jax.ShapeDtypeStruct(valid_edges(cfg).shape, jnp.float32)
  stacked = jax.eval_shape(lambda p: stack_blocks(fwd.cfg, p), fwd.params)
  scratch = jax.eval_shape(lambda: CF.scratch_like(fwd.cfg, prep))
  return CF.circuit_metric.lower(fwd.cfg, fwd.task, fwd.params, batch, prep, w, scratch, stacked)


def test_circuit_metric_program_does_not_grow_with_layers():
  """The layers are one `lax.scan` (issue 30): 8 and 16 layers lower to programs of the same size
  (from 7 layers on the dense reads' `read_buckets` are all there; nothing else depends on the
  depth). The optimised HLO's size: `test_deep_model_reads_past_upstream_senders_with_weight_zero`.
  """
  assert len(CF.read_buckets(_deep(8))) == len(CF.read_buckets(_deep(16))) == CF.READ_BUCKETS + 1
  lines = [len(_metric_lowered(_deep(n)).as_text().splitlines()) for n in (8, 16)]
  assert lines[0] == lines[1], lines


@pytest.mark.slow
def test_deep_model_reads_past_upstream_senders_with_weight_zero():
  """The scanned circuit metric's optimised HLO has as many instructions on 8 layers as on 16. On 9
  layers a layer's dense read covers up to a bucket of rows past its upstream senders
  (`read_buckets`, weighted 0): the circuits equal the graph-form reference, and the all-edges
  and no-edges circuits equal `prepare`'s clean and empty metrics."""
  sizes = [sum(1 for line in _metric_lowered(_deep(n)).compile().as_text().splitlines()
               if _INSTRUCTION.match(line)) for n in (8, 16)]
  assert sizes[0] == sizes[1], sizes
  cfg = dataclasses.replace(_deep(9), n_heads=8, d_head=2)  # > 2 * SPARSE_ROWS senders: both reads
  ups = [E.n_upstream_of_attn(cfg, li) for li in range(cfg.n_layers)]
  assert any(n not in CF.read_buckets(cfg) for n in ups) and ups[-1] > 2 * CF.SPARSE_ROWS
  params = _params(cfg)
  data = tasks.make_induction(8, 4, cfg.d_vocab, seed=0, bos_id=0)
  weights = _circuits(cfg)
  ref = V.evaluate_circuits(cfg, params, data, weights, batch_size=4, quiet=True, reference=True)
  fast = V.evaluate_circuits(cfg, params, data, weights, batch_size=4, quiet=True)
  assert np.std(ref[2:]) > 1e-3
  np.testing.assert_allclose(fast, ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)
  batch = next(data.batches(4))
  fwd = CF.CircuitForward(cfg, params, data.task, valid_edges(cfg))
  prep = fwd.prepare(batch, A.make_ablation(cfg, params, data, "patching", 4))
  valid = valid_edges(cfg).astype(np.float32)
  scratch = CF.scratch_like(fwd.cfg, prep)
  for w, want in ((valid, prep.clean_total), (0 * valid, prep.empty_total)):
    got, scratch = CF.circuit_metric(fwd.cfg, fwd.task, fwd.params, batch, prep, jnp.asarray(w),
                                     scratch, fwd.stacked)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
