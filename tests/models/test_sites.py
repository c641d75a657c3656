"""Named sites and interventions as explicit arguments (identity, patching, vmap, grad, locality).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp.interventions import Add, MeanAblate, Patch, Where, Zero
from tests.conftest import random_tokens

CFG = models.ModelConfig(family="gpt2", d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64,
                         d_vocab=50, n_ctx=32)
PARAMS = models.init_params(CFG, jax.random.PRNGKey(0))
CLEAN = random_tokens((2, 7), vocab=50, seed=1)
CORRUPT = random_tokens((2, 7), vocab=50, seed=2)


def run(tokens=CLEAN, **kw):
  return models.forward(CFG, PARAMS, tokens, **kw)


@pytest.mark.parametrize("cfg", [
    CFG,
    models.ModelConfig(family="llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8,
                       d_mlp=48, d_vocab=50, normalization="rmsnorm", positional="rotary",
                       rotary_dim=8, gated_mlp=True, act_fn="silu", attn_bias=False,
                       attn_out_bias=False, mlp_bias=False),
])
def test_every_site_patched_with_itself_is_identity(cfg):
  params = models.init_params(cfg, jax.random.PRNGKey(1))
  names = models.site_names(cfg)
  base = models.forward(cfg, params, CLEAN)
  # Per-head q/k/v inputs switch a layer to split inputs, where ln1.hook_normalized is per head.
  split = [n for n in names if n.endswith("_input")]
  for group in ([n for n in names if n not in split], split):
    out, cache = models.forward(cfg, params, CLEAN, collect=group)
    np.testing.assert_allclose(np.asarray(out), np.asarray(base), atol=2e-5)
    assert set(cache) == set(group)
    for name in group:
      out = models.forward(cfg, params, CLEAN, interventions={name: Patch(cache[name])})
      np.testing.assert_allclose(np.asarray(out), np.asarray(base), atol=2e-5, err_msg=name)


def test_site_shapes_follow_transformerlens():
  _, c = run(collect=["blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern",
                      "blocks.0.attn.hook_result", "blocks.1.hook_q_input",
                      "blocks.0.mlp.hook_post", "hook_embed"])
  assert c["blocks.0.attn.hook_z"].shape == (2, 7, 4, 8)
  assert c["blocks.0.attn.hook_pattern"].shape == (2, 4, 7, 7)
  assert c["blocks.0.attn.hook_result"].shape == (2, 7, 4, 32)
  assert c["blocks.1.hook_q_input"].shape == (2, 7, 4, 32)
  assert c["blocks.0.mlp.hook_post"].shape == (2, 7, 64)
  np.testing.assert_allclose(c["blocks.0.attn.hook_pattern"].sum(-1), 1.0, atol=1e-5)


def test_patching_resid_pre_0_with_corrupted_gives_corrupted_logits():
  _, cache = run(CORRUPT, collect=["blocks.0.hook_resid_pre"])
  out = run(interventions={"blocks.0.hook_resid_pre": Patch(cache["blocks.0.hook_resid_pre"])})
  np.testing.assert_allclose(np.asarray(out), np.asarray(run(CORRUPT)), atol=1e-5)


def test_vmap_over_patches_equals_loop():
  K = 5
  patches = jax.random.normal(jax.random.PRNGKey(3), (K, 32))
  where = Where.of(positions=[2, 3])

  def f(v):
    return run(interventions={"blocks.1.hook_resid_pre": Patch(v, where)})

  batched = jax.jit(jax.vmap(f))(patches)
  for k in range(K):
    np.testing.assert_allclose(np.asarray(batched[k]), np.asarray(f(patches[k])), atol=1e-5)


@pytest.mark.slow
def test_grad_of_zero_additive_intervention_matches_finite_differences():
  site = "blocks.1.hook_resid_mid"
  with jax.enable_x64(True):  # float64 so central differences are accurate
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), PARAMS)

    def metric(v):
      logits = models.forward(CFG, params, CLEAN,
                              interventions={site: Add(v, where=Where.of(positions=[4]))})
      return logits[:, -1, 3].mean() - logits[:, -1, 7].mean()

    g = jax.grad(metric)(jnp.zeros(32, jnp.float64))
    assert float(jnp.abs(g).max()) > 0
    eps = 1e-4
    key = jax.random.PRNGKey(4)
    for i in range(4):
      d = jax.random.normal(jax.random.fold_in(key, i), (32,), jnp.float64)
      fd = (metric(eps * d) - metric(-eps * d)) / (2 * eps)
      np.testing.assert_allclose(float(jnp.dot(g, d)), float(fd), rtol=1e-5, atol=1e-8)


def test_zero_ablating_one_head_changes_only_downstream_sites():
  names = [n for n in models.site_names(CFG) if not n.endswith("_input")]
  base, c0 = run(collect=names)
  _, c1 = run(collect=names, interventions={"blocks.1.attn.hook_z": Zero(Where.of(heads=[2]))})
  order = {n: i for i, n in enumerate(names)}
  z = order["blocks.1.attn.hook_z"]
  for n in names:
    same = np.allclose(np.asarray(c0[n]), np.asarray(c1[n]), atol=1e-6)
    if order[n] < z:
      assert same, f"{n} is upstream of the ablation but changed"
  assert not np.allclose(c0["blocks.1.hook_attn_out"], c1["blocks.1.hook_attn_out"])
  assert not np.allclose(c0["blocks.2.hook_resid_pre"], c1["blocks.2.hook_resid_pre"])
  z1 = np.asarray(c1["blocks.1.attn.hook_z"])
  assert np.all(z1[:, :, 2] == 0) and np.allclose(
      z1[:, :, [0, 1, 3]], np.asarray(c0["blocks.1.attn.hook_z"])[:, :, [0, 1, 3]])


def test_mean_ablation_and_batch_selection():
  site = "blocks.0.hook_mlp_out"
  _, c = run(collect=[site])
  mean = c[site].mean((0, 1))
  _, c2 = run(collect=[site], interventions={site: MeanAblate(mean, Where.of(batch=[1]))})
  np.testing.assert_allclose(c2[site][0], c[site][0])
  np.testing.assert_allclose(c2[site][1], np.broadcast_to(mean, (7, 32)), atol=1e-6)


def test_unknown_site_and_bad_shape_errors():
  with pytest.raises(models.SiteError, match=r"blocks\.0\.hook_resid_pree.*did you mean"):
    run(interventions={"blocks.0.hook_resid_pree": Zero()})
  from jaxinterp.interventions import InterventionError
  with pytest.raises(InterventionError, match="does not broadcast"):
    run(interventions={"blocks.0.hook_resid_pre": Patch(jnp.zeros((3, 5)))})
  with pytest.raises(InterventionError, match="out of range"):
    run(interventions={"blocks.0.attn.hook_z": Zero(Where.of(heads=[9]))})


NEOX = models.ModelConfig(family="gpt_neox", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64,
                          d_vocab=50, positional="rotary", rotary_dim=4, parallel_attn_mlp=True,
                          act_fn="gelu", tied_embeddings=False)
GEMMA = models.ModelConfig(family="gemma2", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_head=8, d_mlp=48, d_vocab=50, normalization="rmsnorm",
                           rmsnorm_plus_one=True, post_norms=True, positional="rotary",
                           rotary_dim=8, gated_mlp=True, act_fn="gelu_pytorch_tanh",
                           attn_bias=False, attn_out_bias=False,
                           mlp_bias=False, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                           sliding_window=3, sliding_layers=(0,))


@pytest.mark.parametrize("cfg", [CFG, NEOX, GEMMA],
                         ids=["gpt2", "neox-parallel", "gemma2-postnorm"])
def test_edge_form_identity_and_full_ablation(cfg):
  """w = 1 is the clean model; w = 0 with corrupted senders is the corrupted run."""
  from jaxinterp.models import edges as E
  params = PARAMS if cfg is CFG else models.init_params(cfg, jax.random.PRNGKey(5))

  def fwd(tokens, **kw):
    return models.forward(cfg, params, tokens, **kw)

  def senders(tokens):
    _, c = fwd(tokens, edges=models.EdgePatch(None, None), collect=["hook_senders"])
    return c["hook_senders"]

  ablated = senders(CORRUPT)
  assert ablated.shape == (2, 7, E.n_senders(cfg), cfg.d_model)
  ones = jnp.ones((E.n_senders(cfg), E.n_receivers(cfg)))
  np.testing.assert_allclose(fwd(CLEAN, edges=models.EdgePatch(ones, ablated)), fwd(CLEAN),
                             atol=1e-5)
  np.testing.assert_allclose(fwd(CLEAN, edges=models.EdgePatch(0 * ones, ablated)), fwd(CORRUPT),
                             atol=1e-5)
  # A batch of weight matrices in one call.
  ws = jnp.stack([ones, 0 * ones, ones.at[:, -1].set(0)])
  outs = jax.vmap(lambda w: fwd(CLEAN, edges=models.EdgePatch(w, ablated)))(ws)
  np.testing.assert_allclose(outs[1], fwd(CORRUPT), atol=1e-5)
  # Ablating every edge into the logits alone makes the logits read the corrupted final residual.
  np.testing.assert_allclose(outs[2], fwd(CORRUPT), atol=1e-5)
  # The senders sum to the residual stream (the graph decomposition is exact).
  _, c = fwd(CLEAN, edges=models.EdgePatch(None, None),
             collect=["hook_senders", f"blocks.{cfg.n_layers - 1}.hook_resid_post"])
  resid = c[f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
  biases = resid - c["hook_senders"].sum(2)
  assert np.abs(np.asarray(biases - biases[:1, :1])).max() < 1e-5  # a constant: biases only
