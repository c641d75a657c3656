"""QK attribution (`attribution.qk`): the table sums to the score, its terms, and the bundled
induction model's K-composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp import transcoders as T
from jaxinterp.attribution import qk
from jaxinterp.groundtruth import toy

_COMMON = dict(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32)
CONFIGS = {
    "gpt2": models.ModelConfig(family="gpt2", **_COMMON),
    "llama": models.ModelConfig(family="llama", n_kv_heads=2, normalization="rmsnorm",
                                positional="rotary", rotary_dim=8, gated_mlp=True, mlp_bias=False,
                                act_fn="silu", attn_bias=False, attn_out_bias=False,
                                tied_embeddings=False, **_COMMON),
    # qk-norm over each head, (1 + w) RMSNorm, partial rotary, GQA, attention biases (Qwen-like)
    "qwen3": models.ModelConfig(family="qwen3", n_kv_heads=1, normalization="rmsnorm",
                                rmsnorm_plus_one=True, qk_norm="head", positional="rotary",
                                rotary_dim=4, gated_mlp=True, mlp_bias=False, act_fn="silu",
                                attn_bias=True, attn_out_bias=False, tied_embeddings=False,
                                **_COMMON),
}
TOKENS = np.array([0, 7, 3, 19, 7, 3, 25, 11, 40, 3])


def _params(cfg, seed=0):
  """Random weights of init's shapes (traced, not run: fast); norm weights near 1, and random
  (not zero) biases, so that every bias term is exercised."""
  shapes = jax.eval_shape(lambda k: models.init_params(cfg, k), jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    norm = any(getattr(k, "key", None) in ("ln1", "ln2", "ln_final", "q_norm", "k_norm")
               for k in path) and getattr(path[-1], "key", None) == "w"
    return jnp.asarray((1.0 if norm else 0.0) + 0.3 * rng.normal(size=x.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


_forward = jax.jit(models.forward, static_argnames=("cfg", "collect"))


def _scores(cfg, params, tokens):
  """Every layer's scores and pattern [layer, head, query, key] from one forward."""
  names = tuple(f"blocks.{li}.attn.hook_{x}" for li in range(cfg.n_layers)
                for x in ("attn_scores", "pattern"))
  _, cache = _forward(cfg, params, jnp.asarray(tokens)[None], collect=names)
  return (np.stack([cache[n][0] for n in names[::2]]), np.stack([cache[n][0] for n in names[1::2]]))


@pytest.mark.parametrize("family", ["gpt2", "llama",
                                    pytest.param("qwen3", marks=pytest.mark.slow)])
def test_table_sums_to_the_score_with_the_bias_terms_listed(family):
  cfg = CONFIGS[family]
  params = _params(cfg)
  all_scores, all_patterns = _scores(cfg, params, TOKENS)
  for head, query in (("a0.h1", 9), ("a2.h3", 9), ("a2.h3", 5)):
    layer = int(head[1])
    scores, pattern = all_scores[layer], all_patterns[layer]
    tables = qk.explain_keys(cfg, params, TOKENS, head, query)
    assert [t.key for t in tables] == list(range(query + 1))
    for t in tables:
      h = int(head[-1])
      np.testing.assert_allclose(t.table.sum(), scores[h, query, t.key], rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(t.score, scores[h, query, t.key], rtol=1e-5, atol=1e-5)
      assert t.pattern == pytest.approx(float(pattern[h, query, t.key]), abs=1e-6)
    senders = ["input"] + [f"{k}{li}{s}" for li in range(layer)
                           for k, s in [("a", f".h{x}") for x in range(4)] + [("m", "")]]
    biases = {"gpt2": (["b_O"] if layer else []) + ["ln1.b"], "llama": [], "qwen3": []}[family]
    with_bias = cfg.attn_bias
    assert tables[0].query_names == tuple(senders + biases + (["b_Q"] if with_bias else []))
    assert tables[0].key_names == tuple(senders + biases + (["b_K"] if with_bias else []))


def test_terms_are_the_senders_and_biases_through_the_frozen_norm():
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  t = qk.explain_attention(cfg, params, TOKENS, "a2.h1", -1, 4)
  # b_O x b_K: the earlier layers' output biases through ln1 (its scale at the query), dotted with
  # b_K, equals that computed by hand.
  x = np.asarray(params["blocks_0"]["attn"]["b_O"] + params["blocks_1"]["attn"]["b_O"])
  _, cache = _forward(cfg, params, jnp.asarray(TOKENS)[None], collect=("blocks.2.hook_resid_pre",))
  resid = np.asarray(cache["blocks.2.hook_resid_pre"][0, -1], np.float64)
  ln = params["blocks_2"]["ln1"]
  qx = (x - x.mean()) / np.sqrt(resid.var() + cfg.norm_eps) * np.asarray(ln["w"])
  q = qx @ np.asarray(params["blocks_2"]["attn"]["W_Q"][1])
  want = q @ np.asarray(params["blocks_2"]["attn"]["b_K"][1]) / np.sqrt(cfg.d_head)
  got = t.table[t.query_names.index("b_O"), t.key_names.index("b_K")]
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert "score" in t.summary(3) and len(t.top(3)) == 3


def test_patching_difference_sums_to_the_score_change():
  cfg = CONFIGS["llama"]
  params = _params(cfg)
  corrupted = TOKENS.copy()
  corrupted[1:4] = [5, 6, 8]
  p = qk.explain_patching(cfg, params, TOKENS, corrupted, "a1.h2", 9, 4)
  np.testing.assert_allclose(p.delta.table.sum(), p.clean.score - p.corrupted.score, atol=1e-4)
  assert p.delta.pattern == pytest.approx(p.clean.pattern - p.corrupted.pattern)
  np.testing.assert_allclose(p.delta.table, p.clean.table - p.corrupted.table)
  assert "difference" in p.summary(2)


def _transcoders(cfg, cross: bool, F=12, seed=3):
  L, D = cfg.n_layers, cfg.d_model
  ks = iter(jax.random.split(jax.random.PRNGKey(seed), 8))

  def a(*s):
    return 0.3 * jax.random.normal(next(ks), s)

  if cross:
    W_dec = tuple(a(F, L - s, D) for s in range(L))
    return T.CrossLayerTranscoder(a(L, D, F), a(L, F), W_dec, a(L, D), input_hook="mlp.hook_in")
  return T.PerLayerTranscoders(a(L, D, F), a(L, F), a(L, F, D), a(L, D),
                               input_hook="ln2.hook_normalized")


@pytest.mark.slow  # ~10 s: two transcoder sets (a PLT, a CLT), each compiling its own forward
def test_transcoder_features_split_the_mlp_terms():
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  plain = qk.explain_attention(cfg, params, TOKENS, "a2.h0", 9, 6)
  for cross in (False, True):
    _check_split(cfg, params, plain, _transcoders(cfg, cross))
  other = models.ModelConfig(family="gpt2", **{**_COMMON, "d_model": 16})
  with pytest.raises(T.TranscoderError, match="d_model 16"):
    qk.explain_attention(cfg, params, TOKENS, "a2.h0", 9, 6, transcoders=_transcoders(other, False))


def _check_split(cfg, params, plain, tc):
  split = qk.explain_attention(cfg, params, TOKENS, "a2.h0", 9, 6, transcoders=tc)
  np.testing.assert_allclose(split.table.sum(), split.score, rtol=1e-4, atol=1e-4)
  assert "m0" not in split.query_names and "m1.error" in split.key_names
  feats = [n for n in split.query_names if ".f" in n]
  assert feats and all(n.startswith(("m0.f", "m1.f")) for n in feats)
  # the MLP terms (features, decoder biases, errors) carry exactly the two MLP senders' part
  mlp = [i for i, n in enumerate(split.query_names) if n.startswith("m")]
  mlp_plain = [plain.query_names.index(n) for n in ("m0", "m1")]
  np.testing.assert_allclose(split.table[mlp].sum(), plain.table[mlp_plain].sum(), atol=1e-4)
  same = [n for n in plain.query_names if not n.startswith("m")]
  np.testing.assert_allclose(
      split.table[[split.query_names.index(n) for n in same]].sum(1).sum(),
      plain.table[[plain.query_names.index(n) for n in same]].sum(1).sum(), atol=1e-4)


def test_bad_heads_and_positions_are_one_line():
  cfg = CONFIGS["gpt2"]
  params = _params(cfg)
  for kw, match in [(dict(head="a3.h0"), "not in the model"), (dict(head="L1H0"), "like 'a1.h0'"),
                    (dict(key=10), "outside the prompt"), (dict(query=3, key=5), "causal mask"),
                    (dict(query=-11), "query position -11 is outside")]:
    args = dict(head="a1.h0", query=9, key=2) | kw
    with pytest.raises(qk.QKError, match=match):
      qk.explain_attention(cfg, params, TOKENS, args["head"], args["query"], args["key"])


def test_induction_head_attends_through_the_previous_token_head():
  """Issue 28's target: on the bundled model, a1.h0 at the last position attends to the token
  after the earlier occurrence of the final token, and the key term that says so first is a0.h3
  (the previous-token head) at that position."""
  model = toy.load_toy()
  data = toy.induction_task_dataset(4)
  for row in data.clean:
    final = row[-1]
    after = int(np.nonzero(row[:-1] == final)[0][0]) + 1
    tables = qk.explain_keys(model.cfg, model.params, row, "a1.h0", -1)
    for t in tables:
      np.testing.assert_allclose(t.table.sum(), t.score, rtol=1e-5, atol=1e-4)
    assert qk.rank_key_senders(tables, 1)[0][:2] == ("a0.h3", after)
    best = tables[after]
    assert max(best.key_totals().items(), key=lambda kv: kv[1])[0] == "a0.h3"
    assert best.pattern > 0.9
