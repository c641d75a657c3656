"""Transcoders as data, their files and hooks, training, and the graph's own invariants (no
circuit-tracer needed; test_circuit_tracer.py compares with it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxinterp import models
from jaxinterp import transcoders as T
from tests.transcoders.graphs import random_graph

L, D, F = 2, 8, 16


def _plt(seed=0, jump=False, skip=False, d=D, n_layers=L):
  r = np.random.default_rng(seed)
  a = lambda *s: jnp.asarray(r.normal(size=s) * 0.5, jnp.float32)  # noqa: E731
  return T.PerLayerTranscoders(
      a(n_layers, d, F), a(n_layers, F), a(n_layers, F, d), a(n_layers, d),
      threshold=jnp.asarray(r.uniform(0, 0.5, (n_layers, F)), jnp.float32) if jump else None,
      W_skip=a(n_layers, d, d) if skip else None)


def _tiny_cfg(**kw):
  base = dict(family="gpt2", d_model=D, n_layers=L, n_heads=2, d_head=4, d_mlp=32, d_vocab=40,
              n_ctx=16)
  return models.ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("jump,skip", [(False, False), (True, True)])
def test_plt_is_the_formula(jump, skip):
  tc = _plt(jump=jump, skip=skip)
  x = np.random.default_rng(1).normal(size=(L, 3, 5, D)).astype(np.float32)
  for la in range(L):
    pre = x[la] @ np.asarray(tc.W_enc[la]) + np.asarray(tc.b_enc[la])
    f = pre * (pre > np.asarray(tc.threshold[la])) if jump else np.maximum(pre, 0)
    y = f @ np.asarray(tc.W_dec[la]) + np.asarray(tc.b_dec[la])
    if skip:
      y = y + x[la] @ np.asarray(tc.W_skip[la])
    np.testing.assert_allclose(tc.encode(x)[la], f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tc.reconstruct(x)[la], y, rtol=1e-5, atol=1e-5)
  assert tc.astype(jnp.bfloat16).reconstruct(x).dtype == jnp.bfloat16


def test_clt_writes_to_every_later_layer():
  r = np.random.default_rng(0)
  n = 3
  W_dec = tuple(jnp.asarray(r.normal(size=(F, n - s, D)), jnp.float32) for s in range(n))
  clt = T.CrossLayerTranscoder(jnp.asarray(r.normal(size=(n, D, F)), jnp.float32),
                               jnp.zeros((n, F)), W_dec, jnp.asarray(r.normal(size=(n, D)))
                               ).validate()
  f = np.abs(r.normal(size=(n, 4, F))).astype(np.float32)
  want = np.stack([np.asarray(clt.b_dec[t]) + sum(f[s] @ np.asarray(W_dec[s][:, t - s])
                                                  for s in range(t + 1)) for t in range(n)])
  np.testing.assert_allclose(clt.decode(f), want, rtol=1e-5, atol=1e-4)
  with pytest.raises(T.TranscoderError, match=r"W_dec\[1\] has shape"):
    T.CrossLayerTranscoder(clt.W_enc, clt.b_enc, (W_dec[0], W_dec[0], W_dec[2]),
                           clt.b_dec).validate()


def test_jumprelu_straight_through_gradients():
  z = jnp.array([0.05, 0.29, 0.31, 1.0])
  theta = jnp.array(0.3)
  bw = 0.1
  g = jax.grad(lambda t: T.activations.jumprelu(z, t, bw).sum())(theta)
  # rect((z - 0.3) / 0.1) is 1 for 0.29 and 0.31 only: -(theta / bw) * 2
  assert float(g) == pytest.approx(-6.0)
  g0 = jax.grad(lambda t: T.activations.step(z, t, bw).sum())(theta)
  assert float(g0) == pytest.approx(-20.0)
  gz = jax.grad(lambda z: T.activations.jumprelu(z, theta, bw).sum())(z)
  np.testing.assert_array_equal(gz, [0, 0, 1, 1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("jump,skip", [(False, False), (True, True)])
def test_transcoder_set_round_trip(tmp_path, dtype, jump, skip):
  tc = _plt(jump=jump, skip=skip).astype(dtype)
  path = T.save_transcoder_set(tc, tmp_path / "set", model_name="tiny")
  conf = yaml.safe_load(open(path))
  assert conf["model_kind"] == "transcoder_set" and conf["model_name"] == "tiny"
  back = T.load(tmp_path / "set", _tiny_cfg(), dtype=dtype)
  for a, b in zip(jax.tree_util.tree_leaves(tc), jax.tree_util.tree_leaves(back), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert b.dtype == dtype
  W_dec = tuple(jnp.repeat(tc.W_dec[s][:, None], L - s, axis=1) for s in range(L))
  clt = T.CrossLayerTranscoder(tc.W_enc, tc.b_enc, W_dec, tc.b_dec, threshold=tc.threshold)
  T.save_clt(clt, tmp_path / "clt")
  back = T.load(tmp_path / "clt", dtype=dtype)
  assert isinstance(back, T.CrossLayerTranscoder) and back.activation == clt.activation
  np.testing.assert_array_equal(np.asarray(back.W_dec[0], np.float32),
                                np.asarray(clt.W_dec[0], np.float32))


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg and msg
  return msg


def test_bad_transcoder_files_are_refused_in_one_line(tmp_path):
  T.save_transcoder_set(_plt(), tmp_path / "ok")
  cfg = _tiny_cfg()
  cases = {
      "d_model 8, the model's is 12": lambda: T.load(tmp_path / "ok", _tiny_cfg(d_model=12,
                                                                                 d_head=6)),
      "layer 2 has none": lambda: T.load(tmp_path / "ok", _tiny_cfg(n_layers=3)),
  }
  conf = yaml.safe_load(open(tmp_path / "ok" / "config.yaml"))

  def write(name, **change):
    (tmp_path / name).mkdir(exist_ok=True)
    c = {**conf, **change}
    c["transcoders"] = [str(tmp_path / "ok" / p) for p in conf["transcoders"]]
    c.update({k: v for k, v in change.items() if k == "transcoders"})
    yaml.safe_dump(c, open(tmp_path / name / "config.yaml", "w"))
    return tmp_path / name

  cases["unknown feature_input_hook 'hook_resid_post'"] = lambda: T.load(
      write("hook", feature_input_hook="hook_resid_post"), cfg)
  cases["unknown model_kind"] = lambda: T.load(write("kind", model_kind="sae"), cfg)
  cases["Hugging Face Hub"] = lambda: T.load(write("hf", transcoders=["hf://a/b.safetensors"]), cfg)
  data = (tmp_path / "ok" / "layer_1.safetensors").read_bytes()
  (tmp_path / "trunc").mkdir()
  (tmp_path / "trunc" / "layer_1.safetensors").write_bytes(data[:-40])
  cases["truncated safetensors file"] = lambda: T.load(write(
      "t", transcoders=[str(tmp_path / "ok" / "layer_0.safetensors"),
                        str(tmp_path / "trunc" / "layer_1.safetensors")]), cfg)
  cases["no such file"] = lambda: T.load(write("missing", transcoders=["nope.safetensors"]), cfg)
  cases["parallel attention"] = lambda: T.check_model(
      T.PerLayerTranscoders(**{k: getattr(_plt(), k) for k in ("W_enc", "b_enc", "W_dec",
                                                               "b_dec")},
                            input_hook="hook_resid_mid"), _tiny_cfg(parallel_attn_mlp=True))
  g = random_graph(0)
  cases["node_threshold must be in (0, 1]"] = lambda: T.prune(g, node_threshold=1.5)
  cases["edge_threshold must be in (0, 1]"] = lambda: T.prune(g, edge_threshold=0.0)
  for expected, call in cases.items():
    with pytest.raises(T.TranscoderError) as e:
      call()
    assert expected in _one_line(e), (expected, str(e.value))


def test_non_finite_threshold_is_refused(tmp_path):
  tc = _plt(jump=True)
  tc = tc.replace(threshold=tc.threshold.at[1, 3].set(jnp.nan))
  T.save_transcoder_set(tc, tmp_path)
  with pytest.raises(T.TranscoderError, match="non-finite") as e:
    T.load(tmp_path)
  _one_line(e)


def test_hooks_map_onto_existing_sites():
  for kw in ({}, {"normalization": "rmsnorm", "post_norms": True, "family": "gemma2"}):
    cfg = _tiny_cfg(**kw)
    names = set(models.site_names(cfg))
    for inp in T.hooks.INPUT_HOOKS:
      s = T.sites_for(cfg, inp, "hook_mlp_out")
      assert {s.input_at(1), s.output_at(1)} <= names
  with pytest.raises(T.TranscoderError, match="post-MLP norm"):
    T.sites_for(_tiny_cfg(post_norms=True), "mlp.hook_in", "mlp.hook_out")
  with pytest.raises(T.TranscoderError, match="unknown feature_output_hook"):
    T.sites_for(_tiny_cfg(), "mlp.hook_in", "hook_resid_post")


def test_ln2_hook_normalized_is_before_gain_and_bias():
  cfg = _tiny_cfg()
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  r = np.random.default_rng(0)
  for la in range(L):
    params[f"blocks_{la}"]["ln2"] = {"w": jnp.asarray(r.uniform(0.5, 2, D), jnp.float32),
                                     "b": jnp.asarray(r.normal(size=D), jnp.float32)}
  toks = jnp.asarray(r.integers(0, 40, (2, 6)))
  x_in, _ = T.training.collect_activations(cfg, params, toks,
                                            T.sites_for(cfg, "mlp.hook_in", "hook_mlp_out"))
  x_std, _ = T.training.collect_activations(
      cfg, params, toks, T.sites_for(cfg, "ln2.hook_normalized", "hook_mlp_out"))
  for la in range(L):
    ln2 = params[f"blocks_{la}"]["ln2"]
    np.testing.assert_allclose(x_std[la] * ln2["w"] + ln2["b"], x_in[la], rtol=1e-5, atol=1e-5)
  assert x_in.shape == (L, 2 * 5, D)  # BOS left out


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_training_explains_the_mlps(tmp_path, activation):
  cfg = _tiny_cfg()
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  toks = jax.random.randint(jax.random.PRNGKey(1), (16, 12), 0, 40)
  opts = T.TrainOptions(d_transcoder=32, activation=activation, steps=150, batch_size=128,
                        scan="tiny-test")
  res = T.train_transcoders(cfg, params, toks, opts)
  assert res.transcoders.activation == activation
  assert np.all(res.fraction_variance_explained > 0.8), res.fraction_variance_explained
  assert np.all(res.l0 < 32) and np.all(res.l0 > 0), res.l0
  assert res.losses[-1] < res.losses[0] / 3
  T.save_transcoder_set(res.transcoders, tmp_path)
  back = T.load(tmp_path, cfg)
  x, y = T.training.collect_activations(cfg, params, toks, T.sites_for(cfg, opts.input_hook,
                                                                       opts.output_hook))
  fve, l0 = T.training.evaluate(back, x, y)
  np.testing.assert_allclose(fve, res.fraction_variance_explained, rtol=1e-5)
  np.testing.assert_array_equal(l0, res.l0)
  assert back.scan == "tiny-test"


def test_graph_npz_round_trip_and_pruning_keeps_tokens_and_logits(tmp_path):
  g = random_graph(3, n_layers=3, n_pos=5, n_active=20, n_features=15, n_logits=4)
  assert g.n_layers == 3 and g.token_start == 15 + 15
  T.save_npz(g, tmp_path / "graph.npz")
  back = T.load_npz(tmp_path / "graph.npz")
  for k in T.graph.NPZ_ARRAYS:
    np.testing.assert_array_equal(getattr(back, k), getattr(g, k))
  res = T.prune(g)
  assert res.node_mask[g.token_start:].all()
  assert not res.edge_mask[~res.node_mask].any() and not res.edge_mask[:, ~res.node_mask].any()
  full = T.prune(g, 1.0, 1.0)
  assert full.node_mask.sum() >= res.node_mask.sum()
  rep, comp = T.graph_scores(g)
  assert 0 < rep < 1 and 0 < comp < 1
  np.savez(tmp_path / "bad.npz", adjacency=np.zeros((3, 3)))
  with pytest.raises(T.TranscoderError, match="not a graph.npz") as e:
    T.load_npz(tmp_path / "bad.npz")
  _one_line(e)


def _threshold_by_full_sort(scores, threshold):
  """find_threshold's definition: sort every score, descending cumulative share."""
  s = np.sort(np.asarray(scores, np.float32).ravel())[::-1]
  with np.errstate(invalid="ignore"):  # all zeros: 0 / 0, as circuit-tracer's torch gives
    cum = np.cumsum(s, dtype=np.float32) / s.sum(dtype=np.float32)
  return s[min(int(np.searchsorted(cum, np.float32(threshold), side="left")), len(cum) - 1)]


def test_find_threshold_without_a_full_sort_is_the_same_bits():
  """Non-negative scores with zeros skip the sorted copy of the whole matrix; the total keeps
  numpy's pairwise order over the padded array (`_padded_sum`), so every threshold is the same
  bits as sorting everything: small and large arrays, -0.0, all zeros, negatives."""
  rng = np.random.default_rng(0)
  for trial in range(60):
    n = int(rng.integers(1, 200)) if trial % 2 else int(rng.integers(200, 300_000))
    scores = (rng.random(n) ** 6).astype(np.float32)
    scores[rng.random(n) < rng.random()] = 0
    if trial % 7 == 3:
      scores[rng.random(n) < 0.1] = -0.0
    if trial % 11 == 5:
      scores[:] = 0
    if trial % 13 == 6:
      scores[0] = -1.0
    for thr in (0.5, 0.8, 0.98, 1.0):
      want = _threshold_by_full_sort(scores, thr)
      got = T.pruning.find_threshold(scores, thr)
      if want == 0:  # a zero threshold: -0.0 or 0.0, which compare (and mask) alike
        assert got == 0, (trial, n, thr)
      else:
        assert np.float32(got).tobytes() == np.float32(want).tobytes(), (trial, n, thr)
  for k in range(0, 300):
    head = np.sort(rng.random(k).astype(np.float32))[::-1]
    n = k + int(rng.integers(0, 5000))
    full = np.zeros(n, np.float32)
    full[:k] = head
    assert T.pruning._padded_sum(head, n).tobytes() == full.sum(dtype=np.float32).tobytes()


def test_prune_scores_are_graph_scores():
  g = random_graph(4, n_layers=3, n_pos=6, n_active=30, n_features=20, n_logits=3)
  res = T.prune(g)
  assert (res.replacement_score, res.completeness_score) == T.graph_scores(g)
