"""Intervention types against hand-computed numpy results, spec errors, pyvene agreement, steering
and cross-model patching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinterp import interventions as I
from jaxinterp import models
from jaxinterp.interventions import InterventionError, Where, WhereEach
from jaxinterp.interventions.steering import (
  cross_model_patch,
  mean_difference,
  same_architecture,
  steer,
)

RNG = np.random.RandomState(0)
B, P, D = 2, 3, 4
X = RNG.randn(B, P, D).astype(np.float32)
S = RNG.randn(B, P, D).astype(np.float32)


def rand_orth(d, seed=1):
  q, _ = np.linalg.qr(np.random.RandomState(seed).randn(d, d))
  return q.astype(np.float32)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------
# Hand-computed results


def test_interchange_full_and_dims():
  close(I.Interchange(S)(X), S)
  want = X.copy()
  want[..., [0, 2]] = S[..., [0, 2]]
  close(I.Interchange(S, dims=(0, 2))(X), want)
  want = X.copy()
  want[:, 1, 3] = S[:, 1, 3]
  close(I.Interchange(S, dims=(3,), where=Where.of(positions=1))(X), want)


def test_interchange_from_one_source_position_broadcasts():
  want = X.copy()
  want[:, 2] = S[:, 0]
  close(I.Interchange(S[:, [0]], where=Where.of(positions=2))(X), want)


def test_add_subtract_zero():
  v = RNG.randn(D).astype(np.float32)
  close(I.Add(v, 2.0)(X), X + 2 * v)
  close(I.Subtract(v, 0.5)(X), X - 0.5 * v)
  want = X.copy()
  want[1] = 0
  close(I.Zero(Where.of(batch=1))(X), want)


def test_gaussian_noise_explicit_key():
  key = jax.random.PRNGKey(3)
  noise = np.asarray(jax.random.normal(key, X.shape, jnp.float32))
  close(I.GaussianNoise(key, 0.1)(X), X + 0.1 * noise)
  want = X.copy()
  want[..., 1] += 0.1 * noise[..., 1]
  close(I.GaussianNoise(key, 0.1, dims=(1,))(X), want)
  a, b = I.GaussianNoise(key, 1.0)(X), I.GaussianNoise(jax.random.PRNGKey(4), 1.0)(X)
  assert not np.allclose(a, b)


def test_sigmoid_mask():
  m = np.array([-1.0, 0.0, 2.0, 10.0], np.float32)
  s = 1 / (1 + np.exp(-m / 0.5))
  close(I.SigmoidMask(m, S, 0.5)(X), (1 - s) * X + s * S)


def test_rotated_space():
  R = rand_orth(D)
  rb, rs = X @ R, S @ R
  want = np.concatenate([rs[..., :2], rb[..., 2:]], -1) @ R.T
  close(I.RotatedSpace(R, k=2, source=S)(X), want)


def test_rotated_space_identity_k_d_is_full_interchange():
  close(I.RotatedSpace(np.eye(D, dtype=np.float32), k=D, source=S)(X), I.Interchange(S)(X))
  # any rotation with k = d is a full interchange; k = 0 is the identity
  close(I.RotatedSpace(rand_orth(D), k=D, source=S)(X), S)
  close(I.RotatedSpace(rand_orth(D), k=0, source=S)(X), X)


def test_boundless_rotated_space():
  R, b, T = rand_orth(D), 0.5, 0.7
  i = np.arange(D)

  def sig(z):
    return 1 / (1 + np.exp(-z))

  mask = sig(i / T) * sig((b * D - i) / T)
  want = ((1 - mask) * (X @ R) + mask * (S @ R)) @ R.T
  close(I.BoundlessRotatedSpace(R, jnp.float32(b), jnp.float32(T), source=S)(X), want)


def test_low_rank_rotated_space():
  Bm = rand_orth(D)[:, :2]
  want = X + ((S - X) @ Bm) @ Bm.T
  close(I.LowRankRotatedSpace(Bm, source=S)(X), want)
  # a d x d basis is a full interchange
  close(I.LowRankRotatedSpace(rand_orth(D), source=S)(X), S)


def _sae(n=6, seed=2):
  r = np.random.RandomState(seed)
  return (r.randn(D, n).astype(np.float32), r.randn(n).astype(np.float32) * 0.1,
          r.randn(n, D).astype(np.float32), r.randn(D).astype(np.float32) * 0.1,
          np.abs(r.randn(n)).astype(np.float32) * 0.3)


def test_autoencoder_relu_swap_latents():
  We, be, Wd, bd, _ = _sae()

  def enc(x):
    return np.maximum((x - bd) @ We + be, 0)

  f, fs = enc(X), enc(S)
  f[..., [1, 4]] = fs[..., [1, 4]]
  close(I.Autoencoder(We, be, Wd, bd, source=S, latents=(1, 4))(X), f @ Wd + bd, 1e-4)


def test_jumprelu_sae_edit_and_error_term():
  We, be, Wd, bd, th = _sae()
  pre = X @ We + be
  f = np.where(pre > th, np.maximum(pre, 0), 0)
  g = f * 2.0 + np.array([0, 0, 1, 0, 0, 0], np.float32)
  iv = I.Autoencoder.jumprelu(We, be, Wd, bd, th, latent_scale=np.float32(2.0),
                              latent_add=np.array([0, 0, 1, 0, 0, 0], np.float32), keep_error=True)
  want = g @ Wd + bd + (X - (f @ Wd + bd))
  close(iv(X), want, 1e-4)
  # no edit with keep_error is the identity
  close(I.Autoencoder.jumprelu(We, be, Wd, bd, th, keep_error=True)(X), X, 1e-4)


def test_where_each_per_example_positions():
  want = X.copy()
  want[0, 2] = S[0, 2]
  want[1, 0] = S[1, 0]
  close(I.Interchange(S, where=WhereEach(jnp.array([-1, 0])))(X), want)


def test_interchange_with_source_equal_base_is_identity():
  R = rand_orth(D)
  We, be, Wd, bd, th = _sae()
  for iv in [I.Interchange(X), I.Interchange(X, dims=(1,)), I.RotatedSpace(R, k=2, source=X),
             I.BoundlessRotatedSpace(R, jnp.float32(0.3), jnp.float32(1.0), source=X),
             I.LowRankRotatedSpace(R[:, :3], source=X), I.SigmoidMask(np.ones(D, np.float32), X),
             I.SigmoidMaskRotatedSpace(R, np.ones(D, np.float32), source=X),
             I.Autoencoder.jumprelu(We, be, Wd, bd, th, source=X, keep_error=True)]:
    close(iv(X), X, 1e-4)


def test_chain_and_collect():
  v = np.ones(D, np.float32)
  close(I.Chain((I.Add(v), I.Zero(Where.of(positions=0))))(X), np.concatenate(
      [np.zeros((B, 1, D)), X[:, 1:] + 1], 1))
  c = I.Collect(Where.of(positions=(0, 2), batch=1))
  close(c(X), X)
  close(c.select(X), X[1:, [0, 2]])


def test_orthogonalize_maps():
  raw = np.random.RandomState(0).randn(5, 5).astype(np.float32)
  for m in ("cayley", "qr"):
    R = I.orthogonalize(jnp.asarray(raw), m)
    close(R.T @ R, np.eye(5))
  close(I.orthogonalize(jnp.zeros((5, 5)), "cayley"), np.eye(5))
  Q = I.orthogonalize(jnp.asarray(raw[:, :2]), "qr")
  close(Q.T @ Q, np.eye(2))


# --------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("make, msg", [
    (lambda: I.Interchange()(X), "needs a source activation"),
    (lambda: I.Interchange(S[:, :2])(X), "does not broadcast"),
    (lambda: I.Interchange(S, dims=(7,))(X), "out of range"),
    (lambda: I.RotatedSpace(np.eye(3), k=1, source=S)(X), "rotation has shape"),
    (lambda: I.RotatedSpace(np.eye(D), k=9, source=S)(X), "k=9"),
    (lambda: I.LowRankRotatedSpace(np.eye(3), source=S)(X), "basis has shape"),
    (lambda: I.Autoencoder.jumprelu(*_sae()[:4], None)(X), "needs `threshold`"),
    (lambda: I.Autoencoder(np.ones((3, 2)), np.ones(2), np.ones((2, D)), np.ones(D))(X), "W_enc"),
    (lambda: I.Zero(Where.of(positions=5))(X), "out of range"),
    (lambda: I.Zero(Where.of(heads=0))(X[:, :, 0]), "axis 2"),
    (lambda: I.orthogonalize(jnp.ones((3, 2)), "cayley"), "square"),
    (lambda: I.orthogonalize(jnp.ones((3, 3)), "householder?"), "unknown orthogonal"),
])
def test_spec_errors(make, msg):
  with pytest.raises(InterventionError, match=msg):
    make()


def test_errors_surface_under_jit():
  with pytest.raises(InterventionError, match="rotation has shape"):
    jax.jit(lambda iv, x: iv(x))(I.RotatedSpace(jnp.eye(3), k=1, source=S), X)


@st.composite
def specs(draw):
  kind = draw(st.sampled_from(["interchange", "rotated", "lowrank", "boundless", "mask", "noise",
                               "add", "zero"]))
  d = draw(st.integers(1, 6))  # the intervention's dimension; the site has D
  k = draw(st.integers(-1, 7))
  pos = draw(st.one_of(st.none(), st.integers(-4, 4)))
  dims = draw(st.one_of(st.none(), st.lists(st.integers(-6, 6), min_size=0, max_size=3)))
  src_p = draw(st.sampled_from([P, 1, 2]))
  return kind, d, k, pos, dims, src_p


def _build(kind, d, k, pos, dims, src_p):
  where = Where.of(positions=pos)
  src = np.ones((B, src_p, D), np.float32)
  if kind == "interchange":
    return I.Interchange(src, dims=None if dims is None else tuple(dims), where=where)
  if kind == "rotated":
    return I.RotatedSpace(np.eye(d, dtype=np.float32), k=k, source=src, where=where)
  if kind == "lowrank":
    return I.LowRankRotatedSpace(np.eye(D, dtype=np.float32)[:, :max(d, 0)] if d <= D
                                 else np.ones((d, 1), np.float32), source=src, where=where)
  if kind == "boundless":
    return I.BoundlessRotatedSpace(np.eye(d, dtype=np.float32), source=src, where=where)
  if kind == "mask":
    return I.SigmoidMask(np.zeros(d, np.float32), src, where=where)
  if kind == "noise":
    return I.GaussianNoise(jax.random.PRNGKey(0), 1.0, dims=None if dims is None else tuple(dims),
                           where=where)
  if kind == "add":
    return I.Add(np.ones(d, np.float32), where=where)
  return I.Zero(where)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_random_specs_apply_or_raise_intervention_error(spec):
  try:
    iv = _build(*spec)
    y = iv(jnp.asarray(X))
  except InterventionError:
    return
  assert y.shape == X.shape
  assert np.all(np.isfinite(np.asarray(y)))


# --------------------------------------------------------------------------------------------------
# In the model: several sites, multi-source, collect, steering, cross-model


CFG = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32,
                         d_vocab=23, n_ctx=8)


@pytest.fixture(scope="module")
def two_models():
  return (models.init_params(CFG, jax.random.PRNGKey(0)),
          models.init_params(CFG, jax.random.PRNGKey(1)))


def toks(seed, b=3, p=5):
  return np.random.RandomState(seed).randint(0, CFG.d_vocab, (b, p)).astype(np.int32)


def test_run_several_sites_multi_source(two_models):
  params, _ = two_models
  base, s1, s2 = toks(0), toks(1), toks(2)
  a, b = "blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"
  ivs = {a: I.Interchange(where=Where.of(positions=1)),
         b: I.Interchange(dims=(0, 3), where=Where.of(positions=4, heads=1)),
         "blocks.1.hook_mlp_out": I.Collect(Where.of(positions=-1))}
  logits, cache = I.run(CFG, params, base, ivs, sources={a: s1, b: s2})
  # by hand: collect each source separately, then patch
  _, c1 = models.forward(CFG, params, s1, collect=(a,))
  _, c2 = models.forward(CFG, params, s2, collect=(b,))
  want, wc = models.forward(CFG, params, base, collect=("blocks.1.hook_mlp_out",), interventions={
      a: I.Interchange(c1[a], where=Where.of(positions=1)),
      b: I.Interchange(c2[b], dims=(0, 3), where=Where.of(positions=4, heads=1))})
  close(logits, want, 1e-5)
  close(cache["blocks.1.hook_mlp_out"], wc["blocks.1.hook_mlp_out"][:, [-1]], 1e-5)
  assert not np.allclose(logits, models.forward(CFG, params, base), atol=1e-4)
  with pytest.raises(InterventionError, match="no source"):
    I.run(CFG, params, base, {a: I.Interchange()})


def test_run_interchange_source_equal_base_is_identity(two_models):
  params, _ = two_models
  base = toks(0)
  key = jax.random.PRNGKey(0)
  ivs = {"blocks.1.hook_resid_pre": I.RotatedSpace(I.orthogonalize(jax.random.normal(key, (16, 16)),
                                                                    "qr"), k=5)}
  logits, _ = I.run(CFG, params, base, ivs, sources=base)
  close(logits, models.forward(CFG, params, base), 1e-4)


def test_mean_difference_and_steer(two_models):
  params, _ = two_models
  pos, neg = toks(3), toks(4, b=4)
  site = "blocks.1.hook_resid_pre"
  v = mean_difference(CFG, params, pos, neg, site, positive_pos=2,
                      negative_pos=np.array([1, 2, 3, 4]))
  _, cp = models.forward(CFG, params, pos, collect=(site,))
  _, cn = models.forward(CFG, params, neg, collect=(site,))
  want = cp[site][:, 2].mean(0) - cn[site][np.arange(4), [1, 2, 3, 4]].mean(0)
  close(v, want, 1e-5)
  iv = steer(v, 3.0, positions=-1)
  _, c = models.forward(CFG, params, pos, interventions={site: iv}, collect=(site,))
  close(c[site][:, -1], cp[site][:, -1] + 3 * v, 1e-5)
  close(c[site][:, :-1], cp[site][:, :-1], 1e-6)


def test_cross_model_patch(two_models):
  pa, pb = two_models
  ta, tb = toks(5), toks(6)
  site = "blocks.1.hook_resid_pre"
  out = cross_model_patch(CFG, pa, pb, ta, tb, site, where=Where.of(positions=3))
  _, ca = models.forward(CFG, pa, ta, collect=(site,))
  want = models.forward(CFG, pb, tb, interventions={site: I.Patch(ca[site], Where.of(positions=3))})
  close(out, want, 1e-6)
  # patching everything at the final residual from A into B on the same tokens gives A's logits
  # there
  out = cross_model_patch(CFG, pa, pb, ta, ta, "ln_final.hook_normalized")
  assert np.argmax(out, -1).tolist() != []
  other = models.init_params(models.ModelConfig(**{**CFG.to_dict(), "d_mlp": 16}),
                             jax.random.PRNGKey(0))
  with pytest.raises(InterventionError, match="same architecture"):
    same_architecture(pa, other)


# --------------------------------------------------------------------------------------------------
# pyvene 0.1.8 agreement (optional: skipped when pyvene is absent)


def _pyvene():
  torch = pytest.importorskip("torch")
  try:
    from pyvene.models import interventions as PI
  except Exception as e:  # pyvene absent or incompatible with the installed transformers
    pytest.skip(f"pyvene unavailable: {e}")
  return torch, PI


def test_pyvene_rotated_space_agrees():
  torch, PI = _pyvene()
  torch.manual_seed(0)
  pv = PI.RotatedSpaceIntervention(embed_dim=D)
  pv.set_interchange_dim(2)
  R = pv.rotate_layer.weight.detach().numpy()
  with torch.no_grad():
    want = pv(torch.tensor(X), torch.tensor(S)).numpy()
  close(I.RotatedSpace(R, k=2, source=S)(X), want)


def test_pyvene_boundless_agrees():
  torch, PI = _pyvene()
  torch.manual_seed(1)
  pv = PI.BoundlessRotatedSpaceIntervention(embed_dim=D)
  pv.set_intervention_boundaries(0.6)
  pv.set_temperature(torch.tensor(0.8))
  R = pv.rotate_layer.weight.detach().numpy()
  x2, s2 = X[:, 0], S[:, 0]  # pyvene's boundless mask is [batch, d]
  with torch.no_grad():
    want = pv(torch.tensor(x2), torch.tensor(s2)).numpy()
  close(I.BoundlessRotatedSpace(R, jnp.float32(0.6), jnp.float32(0.8), source=s2)(x2), want)


def test_pyvene_low_rank_and_sigmoid_mask_agree():
  torch, PI = _pyvene()
  torch.manual_seed(2)
  pv = PI.LowRankRotatedSpaceIntervention(embed_dim=D, low_rank_dimension=2)
  Bm = pv.rotate_layer.weight.detach().numpy()
  with torch.no_grad():
    want = pv(torch.tensor(X), torch.tensor(S)).numpy()
  close(I.LowRankRotatedSpace(Bm, source=S)(X), want)
  pm = PI.SigmoidMaskIntervention(embed_dim=D)
  with torch.no_grad():
    pm.mask.copy_(torch.tensor([-0.02, 0.0, 0.01, 0.03]))
    want = pm(torch.tensor(X), torch.tensor(S)).numpy()
  close(I.SigmoidMask(np.array([-0.02, 0.0, 0.01, 0.03], np.float32), S, 0.01)(X), want)


def test_pyvene_sae_agrees():
  torch, PI = _pyvene()
  We, be, Wd, bd, th = _sae()
  pj = PI.JumpReLUAutoencoderIntervention(embed_dim=D, low_rank_dimension=6)
  pj.set_interchange_dim(3)  # pyvene swaps the first `interchange_dim` latents
  with torch.no_grad():
    for name, v in (("W_enc", We), ("b_enc", be), ("W_dec", Wd), ("b_dec", bd), ("threshold", th)):
      getattr(pj, name).copy_(torch.tensor(v))
    want = pj(torch.tensor(X), torch.tensor(S)).numpy()
  close(I.Autoencoder.jumprelu(We, be, Wd, bd, th, source=S, latents=(0, 1, 2))(X), want, 1e-4)
  pa = PI.AutoencoderIntervention(embed_dim=D, latent_dim=6)
  pa.set_interchange_dim(torch.tensor([1, 4]))
  with torch.no_grad():
    pa.autoencoder.encoder[0].weight.copy_(torch.tensor(We.T))
    pa.autoencoder.encoder[0].bias.copy_(torch.tensor(be))
    pa.autoencoder.decoder[0].weight.copy_(torch.tensor(Wd.T))
    pa.autoencoder.decoder[0].bias.copy_(torch.tensor(bd))
    want = pa(torch.tensor(X), torch.tensor(S)).numpy()
  close(I.Autoencoder(We, be, Wd, bd, source=S, latents=(1, 4))(X), want, 1e-4)
