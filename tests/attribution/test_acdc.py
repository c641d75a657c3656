"""ACDC's trials: each is one call of the circuit forward from the receivers' layer (the layer as
data, one program for every layer), started from the clean sender rows kept per batch. Checked
against the graph-form forward (`models.edges`) with the circuit's edge weights, which is what
ACDC's L is: KL(clean || circuit) at the last real token, or the task metric."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import acdc
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.models.edges import EdgePatch
from jaxinterp.tasks import metrics


def _setup(n_layers=3):
  cfg = models.ModelConfig(family="gpt2", n_layers=n_layers, d_model=32, n_heads=4, d_head=8,
                           d_mlp=64, d_vocab=40, n_ctx=32)
  params = models.init_params(cfg, jax.random.PRNGKey(3))
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)  # a sharp model
  ds = tasks.make_induction(7, 4, cfg.d_vocab, seed=0, bos_id=0)
  return cfg, params, ds, A.make_ablation(cfg, params, ds, "patching", 4)


@functools.partial(jax.jit, static_argnames=("cfg", "task"))
def _sums(cfg, task, params, batch, ablated, w):
  """The graph-form forward's KL and task metric sums over the batch's real rows."""
  logits = models.forward(cfg, params, batch.clean, attention_mask=batch.mask,
                          edges=EdgePatch(w, ablated))
  clean = models.forward(cfg, params, batch.clean, attention_mask=batch.mask)
  kl = metrics.kl_divergence(logits, clean, batch.last)
  return [jnp.sum(jnp.where(batch.valid, v, 0.0)) for v in (kl, task.metric(logits, batch, clean))]


def _reference(cfg, params, ds, ablation, w):
  """(KL, task metric) of circuit w from the graph-form forward: means over the examples."""
  total = np.zeros(2)
  for batch in ds.batches(4):
    total += np.asarray(_sums(cfg, ds.task, params, batch, ablation.values(cfg, params, batch),
                              jnp.asarray(w, jnp.float32)), np.float64)
  return total / len(ds)


def test_trials_equal_the_graph_form_forward_from_every_layer():
  """From the logits' layer down to layer 0 (ACDC's order, which the kept clean rows rely on): a
  circuit whose edges into earlier layers are all present, its later edges random, gives the
  graph-form forward's L, with one compiled trial program for every layer."""
  cfg, params, ds, ablation = _setup()
  valid = valid_edges(cfg)
  m_full = _reference(cfg, params, ds, ablation, valid)[1]
  layer_of = np.minimum(np.arange(valid.shape[1]) // (3 * cfg.n_heads + 1), cfg.n_layers)
  for metric in ("kl", "task"):
    programs = CF.circuit_metric._full._cache_size() + CF.circuit_metric._fast._cache_size()
    ev = acdc._Evaluator(cfg, params, ds, ablation, acdc.ACDCOptions(acdc_batch=4,
                                                                     acdc_metric=metric))
    assert len(ev.batches) == 2  # 7 examples: a padded second batch
    rng = np.random.default_rng(0)
    for layer in range(cfg.n_layers, -1, -1):
      w = np.where(layer_of[None] >= layer, rng.random(valid.shape) < 0.6, 1.0) * valid
      kl, m = _reference(cfg, params, ds, ablation, w)
      want = kl if metric == "kl" else abs(m - m_full)
      assert ev.loss(layer, w) == pytest.approx(want, rel=1e-5, abs=1e-6), (metric, layer)
    programs = (CF.circuit_metric._full._cache_size() + CF.circuit_metric._fast._cache_size()
                - programs)
    assert programs == 1  # one trial program for every layer


def test_acdc_removes_exactly_the_edges_below_tau():
  """ACDC's greedy on a random model: every tried edge's score is the change of L it made, the
  kept ones are those at tau or above, and the final loss is the circuit's L."""
  cfg, params, ds, ablation = _setup(2)
  opts = acdc.ACDCOptions(tau=1e-3, acdc_batch=4, progress=False)
  res = acdc.fit(cfg, params, ds, ablation, opts)
  circuit, tried = res.extras["circuit"], res.scores != 0
  assert 0 < circuit.sum() < valid_edges(cfg).sum()
  assert np.all(res.scores[circuit] >= 1e-3) and np.all(res.scores[tried & ~circuit] < 1e-3)
  want = _reference(cfg, params, ds, ablation, circuit)[0]
  assert res.extras["final_loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_configs_the_circuit_forward_cannot_run_are_refused():
  """LayerNorm post-norms (a head's share of the normed output depends on the run): one clear
  error, before any work."""
  cfg, params, ds, ablation = _setup(1)
  cfg = dataclasses.replace(cfg, post_norms=True)
  assert not CF.supported(cfg)
  with pytest.raises(A.AttributionError, match="circuit forward"):
    acdc.fit(cfg, params, ds, ablation, acdc.ACDCOptions())
