"""The receiver-gradient kernels give the same scores as the weight-gradient kernels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models.transformer import Norm, run_blocks, stack_blocks
from jaxinterp.tasks import metrics as task_metrics

_COMMON = dict(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32)
CONFIGS = {
    "gpt2": models.ModelConfig(family="gpt2", **_COMMON),
    "gpt_neox": models.ModelConfig(family="gpt_neox", positional="rotary", rotary_dim=4,
                                   parallel_attn_mlp=True, act_fn="gelu", tied_embeddings=False,
                                   **_COMMON),
    "llama": models.ModelConfig(family="llama", n_kv_heads=2, normalization="rmsnorm",
                                positional="rotary", rotary_dim=8, gated_mlp=True, mlp_bias=False,
                                act_fn="silu", attn_bias=False, attn_out_bias=False,
                                tied_embeddings=False, **_COMMON),
    # Post-norms, softcaps, (1 + w) RMSNorm, GQA, and a sliding window on every layer (still one
    # block structure, so the scanned kernel runs).
    "gemma2": models.ModelConfig(family="gemma2", n_kv_heads=2, normalization="rmsnorm",
                                 rmsnorm_plus_one=True, post_norms=True, positional="rotary",
                                 rotary_dim=8, gated_mlp=True, mlp_bias=False,
                                 act_fn="gelu_pytorch_tanh", attn_bias=False, attn_out_bias=False,
                                 attn_logit_softcap=50.0, final_logit_softcap=30.0,
                                 sliding_window=3, sliding_layers=(0, 1), embed_scale=5.0,
                                 **_COMMON),
}


@functools.cache
def _scaled_params(cfg, scale):
  p = models.init_params(cfg, jax.random.PRNGKey(1))
  return jax.tree_util.tree_map_with_path(lambda path, x: x * scale if x.ndim >= 2 else x, p)


def _params(cfg, scale=8.0):
  """Random params with weights scaled up so that the scores are far from rounding noise (made
  once per config and scale; each call gets its own containers, so a test may edit them)."""
  return jax.tree.map(lambda x: x, _scaled_params(cfg, scale))


def check_kernel(cfg, task, params, batch, reference, kernel):
  """A receiver-gradient kernel's (scores, metric values, clean metric values) against a
  weight-gradient reference's (scores, metric values): zero on invalid edges, a real signal,
  equal to float rounding. Returns (the reference's valid scores, the clean metric values)."""
  (ref, ref_vals), (got, vals, clean_vals) = reference, kernel
  valid = valid_edges(cfg)
  assert np.all(np.asarray(got)[~valid] == 0)
  ref, got = np.asarray(ref)[valid], np.asarray(got)[valid]
  assert np.abs(ref).max() > 1e-2  # a real signal
  np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=1e-3)
  np.testing.assert_allclose(np.asarray(vals), np.asarray(ref_vals), rtol=1e-5, atol=1e-5)
  _, ref_clean, _ = task_metrics.clean_metric(cfg, task, params, batch)
  np.testing.assert_allclose(np.asarray(clean_vals), np.asarray(ref_clean), rtol=1e-5, atol=1e-5)
  return ref, ref_clean


@pytest.mark.parametrize("family,method", [("gpt2", "EAP-IG-inputs"), ("gpt2", "EAP"),
                                           ("gpt_neox", "EAP-IG-inputs"),
                                           ("llama", "EAP-IG-inputs"),
                                           ("gemma2", "EAP-IG-inputs"),
                                           ("gpt2", "EAP-IG-inputs/mean"),
                                           ("llama", "EAP-IG-inputs/mean")])
@pytest.mark.slow
def test_matches_weight_gradient_kernels(family, method):
  cfg = CONFIGS[family]
  params = _params(cfg)
  ds = tasks.make_induction(6, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(ds.batches(8))  # 2 filler rows: they must not count
  abl = A.Patching()
  if method.endswith("/mean"):  # mean ablation: the clean senders come from their own forward
    abl = A.Mean(A.compute_means(cfg, params, ds, 4))
  alphas = jnp.asarray([1.0] if method == "EAP" else A.ig_alphas(3), jnp.float32)
  ref, ref_clean = check_kernel(
      cfg, ds.task, params, batch,
      A.eap.weight_gradient_batch(cfg, ds.task, params, batch, abl, alphas),
      RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas))
  valid = valid_edges(cfg)
  # The per-head-input kernel (used under remat and for non-uniform layers) agrees too.
  split, split_vals, split_clean = RG._split_ig_inputs_batch(cfg, ds.task, params, batch, abl,
                                                             alphas)
  np.testing.assert_allclose(np.asarray(split)[valid], ref, atol=2e-4 * np.abs(ref).max(),
                             rtol=1e-3)
  np.testing.assert_allclose(np.asarray(split_clean), np.asarray(ref_clean), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_scanned_blocks_equal_forward():
  """The scanned and the layer-by-layer blocks give the unrolled forward's activations."""
  cfg = CONFIGS["gpt_neox"]
  params = _params(cfg, scale=2.0)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 7), 0, cfg.d_vocab)
  mask = jnp.arange(7)[None, :] < jnp.asarray([7, 5, 6])[:, None]
  names = ("attn.hook_q", "hook_resid_post")
  logits, cache = models.forward(cfg, params, tokens, attention_mask=mask,
                                 collect=[f"blocks.{li}.{n}" for li in range(2) for n in names])
  emb = models.embed_inputs(cfg, params, tokens, mask)
  for stacked in (stack_blocks(cfg, params), None):
    resid, ys = run_blocks(cfg, params, emb, mask, collect=names, stacked=stacked)
    for li in range(2):
      for n in names:
        np.testing.assert_allclose(np.asarray(ys[n][li]), np.asarray(cache[f"blocks.{li}.{n}"]),
                                   rtol=1e-5, atol=1e-5)
    x = Norm(cfg).apply({"params": params["ln_final"]}, resid)
    np.testing.assert_allclose(np.asarray(x @ params["W_U"]), np.asarray(logits), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("case", ["alternating sliding window", "blocks too big to stack"])
@pytest.mark.slow
def test_unscanned_blocks(case, monkeypatch):
  """Alternating sliding-window layers can't be scanned, and big models aren't (the stacked copy
  would not fit): the blocks then run one by one, with the same scores."""
  cfg = CONFIGS["gemma2"]
  if case == "alternating sliding window":
    cfg = models.ModelConfig(**{**cfg.to_dict(), "sliding_layers": (0,)})
    assert not models.transformer.layers_uniform(cfg)
  else:
    monkeypatch.setattr(RG, "SCAN_MAX_FRACTION", 0.0)
    assert not RG.scan_blocks_fits(cfg, _params(cfg))
  params = _params(cfg)
  ds = tasks.make_induction(4, 4, cfg.d_vocab, seed=0, bos_id=0)
  batch = next(ds.batches(4))
  alphas = jnp.asarray(A.ig_alphas(2), jnp.float32)
  ref, _ = A.eap.weight_gradient_batch(cfg, ds.task, params, batch, A.Patching(), alphas)
  fn = RG.ig_inputs_batch.__wrapped__  # unjitted: SCAN_MAX_FRACTION is read at trace time
  got, _, _ = fn(cfg, ds.task, params, batch, A.Patching(), alphas)
  valid = valid_edges(cfg)
  ref = np.asarray(ref)[valid]
  np.testing.assert_allclose(np.asarray(got)[valid], ref, atol=2e-4 * np.abs(ref).max(), rtol=1e-3)
