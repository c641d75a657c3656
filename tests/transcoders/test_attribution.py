"""`attribute_graph` without the reference: completeness of the rows on a model without biases,
batch-size invariance, the feature budget, CLTs, and one-line refusals of bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp import transcoders as T
from jaxinterp.transcoders import attribution as TA
from jaxinterp.transcoders import replacement, selection

D, L, F = 16, 2, 24
TOKENS = np.array([0, 5, 7, 9, 11, 3, 7])


def _model(**kw):
  cfg = models.ModelConfig(**{**dict(
      family="llama", d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=32,
      d_vocab=40, n_ctx=16, normalization="rmsnorm", positional="rotary", rotary_dim=4,
      gated_mlp=True, act_fn="silu", attn_bias=False, attn_out_bias=False, mlp_bias=False,
      tied_embeddings=False), **kw})
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda a: a * 10 if a.ndim > 1 else a, params)
  return cfg, params


def _plt(seed=0, b_dec=True, **kw):
  rng = np.random.default_rng(seed)

  def a(*s, scale=0.5):
    return jnp.asarray(rng.normal(size=s) * scale, jnp.float32)

  return T.PerLayerTranscoders(a(L, D, F, scale=D ** -0.5), a(L, F, scale=0.3) - 0.3,
                               a(L, F, D), a(L, D) * b_dec, W_skip=a(L, D, D, scale=0.2), **kw)


@pytest.mark.slow
def test_rows_are_complete_without_biases():
  """Without biases, norms frozen and the position embedding absent, each feature's row sums to
  its pre-activation less b_enc, and each logit's row to its direction at ln_final's output. BOS's
  embedding is zero, so that its MLP outputs (a constant of the replacement model, not a node) are
  zero too."""
  cfg, params = _model()
  params = {**params, "W_E": params["W_E"].at[0].set(0)}
  tc = _plt(b_dec=False)
  g = T.attribute_graph(cfg, params, tc, TOKENS, batch_size=7)
  _, run, _ = replacement.linearize(cfg, params, tc, jnp.asarray(TOKENS))
  la, pa, fa = g.active_features[g.selected_features].T
  pre = np.einsum("nd,nd->n", np.asarray(run.inputs)[la, pa], np.asarray(tc.W_enc)[la, :, fa])
  np.testing.assert_allclose(g.adjacency[:g.n_features].sum(1), pre, rtol=1e-4, atol=1e-4)
  assert g.n_features > 10 and (g.adjacency[:g.n_features, g.error_start:g.token_start] != 0).any()
  targets = T.targets.salient_logits(np.asarray(run.logits[-1]), np.asarray(params["W_U"]))
  final = replacement.replacement_run(cfg, params, tc, jnp.asarray(TOKENS), replacement.Sources(
      jnp.zeros((len(TOKENS), D)), tuple(jnp.zeros((len(TOKENS), D)) for _ in range(L))))[0].final
  want = targets.vectors @ np.asarray(final)[-1]
  np.testing.assert_allclose(g.adjacency[g.logit_start:].sum(1), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_batch_size_and_budget():
  cfg, params = _model(family="gpt2", normalization="layernorm", positional="learned",
                       rotary_dim=0, n_kv_heads=None, gated_mlp=False, act_fn="gelu_new",
                       attn_bias=True, attn_out_bias=True, mlp_bias=True)
  tc = _plt(threshold=jnp.full((L, F), 0.05))
  g = T.attribute_graph(cfg, params, tc, TOKENS, batch_size=64)
  g3 = T.attribute_graph(cfg, params, tc, TOKENS, batch_size=3)
  np.testing.assert_allclose(g3.adjacency, g.adjacency, rtol=1e-5, atol=1e-6)
  same = T.attribute_graph(cfg, params, tc, TOKENS, batch_size=5, max_feature_nodes=10 ** 6)
  np.testing.assert_allclose(same.adjacency, g.adjacency, rtol=1e-5, atol=1e-6)
  k = 7
  small = T.attribute_graph(cfg, params, tc, TOKENS, batch_size=4, max_feature_nodes=k)
  assert small.n_features == k and small.n_nodes == g.n_nodes - (g.n_features - k)
  keep = np.concatenate([small.selected_features, np.arange(g.n_features, g.n_nodes)])
  np.testing.assert_allclose(small.adjacency[:k], g.adjacency[small.selected_features][:, keep],
                             rtol=1e-5, atol=1e-6)
  T.prune(small)  # the budgeted graph is a valid graph


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_clt_rows_match_plt_when_decoders_only_write_their_layer():
  cfg, params = _model()
  tc = _plt(b_dec=False)
  W_dec = tuple(jnp.concatenate([tc.W_dec[s][:, None], jnp.zeros((F, L - s - 1, D))], 1)
                for s in range(L))
  clt = T.CrossLayerTranscoder(tc.W_enc, tc.b_enc, W_dec, tc.b_dec, W_skip=tc.W_skip,
                               input_hook="mlp.hook_in")
  g = T.attribute_graph(cfg, params, tc, TOKENS)
  gc = T.attribute_graph(cfg, params, clt, TOKENS)
  np.testing.assert_allclose(gc.adjacency, g.adjacency, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_cell_chunk_contraction_equals_the_gather(monkeypatch):
  """`_rows` contracts with the decoder entries grouped by (layer, position) cell, in chunks
  smaller and larger than the cells, as the plain gather of every entry's gradient does, for a
  CLT (several entries per feature, summed)."""
  cfg, params = _model()
  tc = _plt()
  W_dec = tuple(jnp.asarray(np.random.default_rng(s).normal(size=(F, L - s, D)), jnp.float32)
                for s in range(L))
  clt = T.CrossLayerTranscoder(tc.W_enc, tc.b_enc, W_dec, tc.b_dec, input_hook="mlp.hook_in")
  for t in (tc, clt):
    like, run, vjp = replacement.linearize(cfg, params, t, jnp.asarray(TOKENS))
    nodes = TA.sources(t, run)
    a = nodes.active[:5]
    args = (jnp.asarray(a[:, 0]), jnp.asarray(a[:, 1]), nodes.encoders[:5])
    gathered = TA._rows(vjp, like, nodes.writers.replace(cell_chunks=None), *args)
    for sizes in ((1,), (2,), (256,)):
      monkeypatch.setattr(TA, "CHUNK_SIZES", sizes)
      w = nodes.writers
      w = w.replace(cell_chunks=TA.cell_chunks(np.asarray(w.dec_node), np.asarray(w.dec_layer),
                                               np.asarray(w.dec_pos), w.dec_vec, len(TOKENS),
                                               w.n_active))
      assert w.cell_chunks.one_per_node == (t is tc)
      chunked = TA._rows(vjp, like, w, *args)
      np.testing.assert_allclose(chunked, gathered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_kw, input_hook", [
    pytest.param({}, "mlp.hook_in", marks=pytest.mark.slow),  # the fast suite's CPU budget
    pytest.param({"post_norms": True, "sliding_window": 4, "sliding_layers": (0, 1)},
                 "ln2.hook_normalized", marks=[pytest.mark.slow, pytest.mark.by_hand]),
    pytest.param({"parallel_attn_mlp": True}, "ln2.hook_normalized",
                 marks=[pytest.mark.slow, pytest.mark.by_hand]),  # by hand: CI's 30 minutes
    pytest.param({"normalization": "layernorm"}, "hook_resid_mid",
                 marks=[pytest.mark.slow, pytest.mark.by_hand]),
])
def test_layered_rows_equal_the_whole_run_vjp(model_kw, input_hook):
  """`_rows_layered`, the backward through blocks top..0 only (each layer's gradients contracted
  inside the loop, or after it), gives `_rows`' rows (the whole run's VJP) for batches whose
  targets sit at layers <= top, logits included with top = L - 1; the gradients above top are
  exactly zero. Post-norms, sliding windows, parallel blocks and each input hook (ln2's
  standardisation among them) re-linearised block by block."""
  cfg, params = _model(**model_kw)
  tc = _plt(input_hook=input_hook)
  like, run, vjp = replacement.linearize(cfg, params, tc, jnp.asarray(TOKENS))
  lv = replacement.layered_vjp(cfg, params, tc, run)
  nodes = TA.sources(tc, run)
  a = nodes.active
  assert (a[:, 0] == 0).sum() >= 8 and (a[:, 0] == 1).sum() >= 6
  rng = np.random.default_rng(0)
  logit = (np.array([L, L]), np.array([len(TOKENS) - 1] * 2), rng.normal(size=(2, D)))
  for top, idx in ((0, np.flatnonzero(a[:, 0] == 0)[:8]), (L - 1, np.arange(len(a))[-6:])):
    lay, pos, vec = a[idx, 0], a[idx, 1], np.asarray(nodes.encoders)[idx]
    if top == L - 1:
      lay, pos, vec = (np.concatenate([x, y]) for x, y in zip(logit, (lay, pos, vec),
                                                             strict=True))
    args = (jnp.asarray(lay, jnp.int32), jnp.asarray(pos, jnp.int32),
            jnp.asarray(vec, jnp.float32))
    want = TA._rows(vjp, like, nodes.writers, *args)
    for w in (nodes.writers, nodes.writers.replace(layer_chunks=None)):  # contracted in / after
      got = TA._rows_layered(lv, like, w, np.int32(top), *args)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    _, outs = replacement.layered_backward(lv, np.int32(top), like, *args)
    assert not np.asarray(outs)[:, top + 1:].any()


def test_layered_vjp_needs_one_block_structure():
  """Alternating sliding-window layers (Gemma-2) differ in structure: no layered VJP, and
  `attribute_graph` falls back to the whole run's VJP."""
  cfg, params = _model(sliding_window=4, sliding_layers=(0,))
  tc = _plt()
  _, run, _ = replacement.linearize(cfg, params, tc, jnp.asarray(TOKENS))
  assert replacement.layered_vjp(cfg, params, tc, run) is None
  g = T.attribute_graph(cfg, params, tc, TOKENS, batch_size=16)
  assert g.n_features > 0 and np.isfinite(g.adjacency).all()


def test_find_threshold_without_sorting_zeros_is_the_full_sort():
  def full_sort(scores, threshold):
    s = np.sort(np.asarray(scores, np.float32).ravel())[::-1]
    cum = np.cumsum(s, dtype=np.float32) / s.sum(dtype=np.float32)
    return s[min(int(np.searchsorted(cum, np.float32(threshold))), len(cum) - 1)]

  rng = np.random.default_rng(0)
  for density in (0.05, 0.5, 1.0):
    x = (rng.lognormal(size=(40, 50)) * (rng.random((40, 50)) < density)).astype(np.float32)
    for t in (0.3, 0.8, 0.98, 1.0):
      want, got = full_sort(x, t), T.pruning.find_threshold(x, t)
      assert got == want and type(got) is type(want), (density, t, got, want)
      assert want == 0 or got.tobytes() == want.tobytes()


def test_top_unvisited_is_the_stable_argsorts_selection():
  """The ranking loop's partition-based selection equals the first `k` unvisited of a stable
  descending argsort: ties (many, and +-0.0) in index order, NaN, every k, and the in-place
  normalisation equals the two-array one."""
  rng = np.random.default_rng(0)
  for trial in range(30):
    n = int(rng.integers(1, 60))
    scores = rng.integers(0, 4, n).astype(np.float32) * (1 if trial % 2 else rng.random(n))
    scores[rng.random(n) < 0.2] = -0.0
    if trial % 5 == 4:
      scores[rng.integers(0, n)] = np.nan
    visited = rng.random(n) < 0.3
    rank = np.argsort(-scores, kind="stable")
    for k in range(0, n + 2):
      want = rank[~visited[rank]][:k]
      np.testing.assert_array_equal(selection.top_unvisited(scores, visited, k), want)
  m = rng.normal(size=(7, 9)).astype(np.float32)
  m[2] = 0
  a = np.abs(m)
  want = a / np.maximum(a.sum(axis=1, keepdims=True), np.float32(1e-10))
  assert T.pruning.normalize_matrix(m).tobytes() == want.tobytes()


@pytest.mark.parametrize("tokens,match", [
    (np.array([0]), "at least one token after BOS"),
    (np.arange(17) % 40, "more than the model's context of 16"),
    (np.array([0, 41]), "outside the vocabulary"),
    (np.zeros((2, 3), int), "one prompt's token ids"),
])
def test_bad_prompts_are_one_line(tokens, match):
  cfg, params = _model()
  with pytest.raises(T.TranscoderError, match=match) as e:
    T.attribute_graph(cfg, params, _plt(), tokens)
  assert "\n" not in str(e.value)


def test_transcoders_for_another_model_are_one_line():
  cfg, params = _model(n_layers=3)
  with pytest.raises(T.TranscoderError, match="layer 2 has none") as e:
    T.attribute_graph(cfg, params, _plt(), TOKENS)
  assert "\n" not in str(e.value)
