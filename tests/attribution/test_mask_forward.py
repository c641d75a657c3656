"""The mask methods' scanned forward (`attribution.mask_forward`) against the graph-form forward
(`models.EdgePatch`) it replaces: the same per-row losses and the same gradients in the edge
weights, for one mask or a mask per row, both objectives, every ablation and every family."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import tasks
from jaxinterp.attribution import mask_forward, masks, ugs
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.groundtruth import toy
from jaxinterp.models.transformer import forward
from tests.attribution.test_receiver_grads import CONFIGS, _params
from tests.models import test_family_methods as FM


def _graph_form(cfg, params, batch, ablation):
  """`clean_and_ablated`'s two values as the graph form reads them."""
  logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  return (jnp.take_along_axis(logits, batch.last[:, None, None], axis=1),
          ablation.values(cfg, params, batch))


ALL = (((), "kl"), ((), "task"), ((6,), "kl"), ((6,), "task"))  # (mask rows, objective)


def _compare(cfg, params, data, kind, cases=ALL):
  """Loss sums and their gradients in w agree to float32 rounding (the sums run in another order:
  A_r + sum_s w delta_s against resid_r - sum_s (1 - w) delta_s)."""
  batch = next(data.batches(6, bucket=None))
  abl = A.make_ablation(cfg, params, data, kind, 6)
  clean, prep = masks.clean_and_ablated(cfg, data.task, params, batch, abl)
  assert isinstance(prep, CF.Prepared)
  clean_g, ablated = _graph_form(cfg, params, batch, abl)
  np.testing.assert_allclose(clean, clean_g, rtol=1e-5, atol=1e-5)
  valid = valid_edges(cfg)
  key = jax.random.PRNGKey(1)
  for rows, objective in cases:  # rows (): one mask for the batch, (6,): one per row
    w = jax.random.uniform(key, rows + valid.shape)

    def total(w, clean, side, objective=objective):
      return masks.circuit_loss(cfg, data.task, objective, params, batch, clean, side, w).sum()

    ours, g = jax.jit(jax.value_and_grad(total))(w, clean, prep)
    ref, g_ref = jax.jit(jax.value_and_grad(total))(w, clean_g, ablated)
    where = f"{cfg.family} {kind} {objective} rows={rows}"
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6, err_msg=where)
    g, g_ref = np.asarray(g)[..., valid], np.asarray(g_ref)[..., valid]
    assert np.abs(g_ref).max() > 1e-5, where  # the gradient is not trivially zero
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-5 * np.abs(g_ref).max(), err_msg=where)


def test_equals_the_graph_form_on_the_toy():
  """A mask per row (UGS's samples), the KL objective, patching."""
  model = toy.load_toy()
  _compare(model.cfg, model.params, toy.induction_task_dataset(12, seq_len=8), "patching",
           cases=(((6,), "kl"),))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["patching", "mean", "zero"])
def test_equals_the_graph_form_for_every_ablation_and_objective(kind):
  model = toy.load_toy()
  _compare(model.cfg, model.params, toy.induction_task_dataset(12, seq_len=8), kind)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CONFIGS) + list(FM.CONFIGS))
def test_equals_the_graph_form_on_every_family(family):
  """Per-row masks under KL, one mask under the task metric, on GPT-2, NeoX (parallel blocks: no
  head feeds its own layer's MLP), Llama (GQA, ungrouped), Gemma-2 (post-norms, softcaps, sliding
  windows), Gemma-3, Qwen3, Mistral, OLMo-2, Phi-3."""
  if family in CONFIGS:
    cfg, params = CONFIGS[family], _params(CONFIGS[family])
  else:
    cfg, params = FM.CONFIGS[family], FM._params(family)
  _compare(cfg, params, tasks.make_induction(8, 4, cfg.d_vocab, seed=0, bos_id=0), "patching",
           cases=(((6,), "kl"), ((), "task")))  # (every case: the toy's test above)


def _ugs_step_lines(n_layers: int) -> int:
  """Lines of a UGS step's lowered program on a GPT-2-like model of n_layers."""
  cfg = dataclasses.replace(CONFIGS["gpt2"], n_layers=n_layers)
  data = tasks.make_induction(4, 4, cfg.d_vocab, seed=0, bos_id=0)
  opts, lr = ugs.UGSOptions(ugs_samples=2, mask_batch=4), ugs.default_lr(None, "patching")
  return ugs.train_step.trace(
      cfg, data.task, opts, lr, _params(cfg, 2.0), A.Patching(),
      ugs.init_state(cfg, lr), next(data.batches(4, bucket=None)), jax.random.PRNGKey(0),
      jnp.asarray(0, jnp.int32)).lower().as_text().count("\n")


@pytest.mark.slow
def test_deep_models_scan_in_groups_and_the_program_grows_slowly(monkeypatch):
  """Up to 4 layers each layer reads exactly its upstream senders; deeper, two scans. What still
  grows with depth (the per-batch `prepare`'s loops over layers) grows at most a quarter as fast
  as the graph form's unrolled layers (measured: 153 against 793 lines per layer)."""
  assert mask_forward.layer_groups(2) == [(0, 1), (1, 2)]
  assert mask_forward.layer_groups(12) == [(0, 6), (6, 12)]
  assert mask_forward.layer_groups(5) == [(0, 2), (2, 5)]
  scan = _ugs_step_lines(12) - _ugs_step_lines(6)
  monkeypatch.setattr(CF, "supported", lambda cfg: False)  # the graph form, for comparison
  jax.clear_caches()  # (trace again: the step's traces above are cached)
  try:
    graph = _ugs_step_lines(12) - _ugs_step_lines(6)
  finally:
    jax.clear_caches()
  assert 0 < 4 * scan < graph, (scan, graph)


@pytest.mark.slow
def test_unsupported_configs_train_on_the_graph_form():
  """LayerNorm post-norms (a head's share of the layer's output depends on the run): the graph form
  runs, and a UGS step trains."""
  cfg = dataclasses.replace(CONFIGS["gemma2"], normalization="layernorm", rmsnorm_plus_one=False)
  assert not CF.supported(cfg)
  params = _params(cfg, 2.0)
  data = tasks.make_induction(4, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(data.batches(4, bucket=None))
  abl = A.Patching()
  clean, ablated = masks.clean_and_ablated(cfg, data.task, params, batch, abl)
  assert ablated.shape == (4, batch.clean.shape[1]) + valid_edges(cfg).shape[:1] + (cfg.d_model,)
  opts = ugs.UGSOptions(ugs_samples=2, mask_batch=4, mask_steps=1)
  lr = ugs.default_lr(None, "patching")
  (theta, _), logs = ugs.train_step(cfg, data.task, opts, lr, params, abl, ugs.init_state(cfg, lr),
                                    batch, jax.random.PRNGKey(0), jnp.asarray(0, jnp.int32))
  assert np.isfinite(float(logs["kl"])) and float(logs["kl"]) > 0
  assert np.any(np.asarray(theta) != ugs.INIT_THETA)
