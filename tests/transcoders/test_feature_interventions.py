"""Feature interventions (`transcoders.interventions`): identities of the JAX code alone, and
equality with circuit-tracer 0.5.0's `feature_intervention` and `feature_intervention_generate`
on the same random models and transcoders (GPT-2-style and Llama-style, per-layer and cross-layer
transcoders), run by `intervention_driver.py` in circuit-tracer's virtual environment (skipped
without it)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp import transcoders as T
from jaxinterp.transcoders import interventions as FI
from tests.transcoders import ct_venv
from tests.transcoders.test_attribution_circuit_tracer import MODELS, _transcoders

D, L, F = 16, 2, 24
TOKENS = np.array([0, 5, 7, 9, 11, 3, 7])


def _model(**kw):
  cfg = models.ModelConfig(**{**dict(
      family="llama", d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=32,
      d_vocab=40, n_ctx=16, normalization="rmsnorm", positional="rotary", rotary_dim=4,
      gated_mlp=True, act_fn="silu", attn_bias=False, attn_out_bias=False, mlp_bias=False,
      tied_embeddings=False), **kw})
  rng = np.random.default_rng(0)

  def leaf(path, s):  # random weights, norm gains near 1 (eval_shape: no eager init, fast)
    if len(s.shape) > 1:
      return jnp.asarray(rng.normal(size=s.shape) * 0.2, jnp.float32)
    return jnp.asarray((path[-1].key == "w") + 0.1 * rng.normal(size=s.shape), jnp.float32)

  shapes = jax.eval_shape(lambda k: models.init_params(cfg, k), jax.random.PRNGKey(0))
  return cfg, jax.tree_util.tree_map_with_path(leaf, shapes)


def _arrays(seed):
  rng = np.random.default_rng(seed)
  return lambda *s, scale=0.5: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)


def _plt(seed=0, **kw):
  a = _arrays(seed)
  return T.PerLayerTranscoders(a(L, D, F, scale=D ** -0.5), a(L, F, scale=0.3) - 0.3,
                               a(L, F, D), a(L, D), W_skip=a(L, D, D, scale=0.2), **kw)


def _clt(seed=1):
  a = _arrays(seed)
  return T.CrossLayerTranscoder(a(L, D, F, scale=D ** -0.5), a(L, F, scale=0.3) - 0.3,
                                tuple(a(F, L - s, D) for s in range(L)), a(L, D),
                                W_skip=a(L, D, D, scale=0.2))


@pytest.fixture(scope="module")
def setup():
  cfg, params = _model()
  tc = _plt()
  clean, acts = FI.feature_intervention(cfg, params, tc, TOKENS, [])
  return cfg, params, tc, np.asarray(clean), np.asarray(acts)


def _remove(cfg, params, tc, layer, freeze=None, layers=None):
  """Logits with `layer`'s decoded features (after BOS) subtracted from the MLP outputs they write
  (the error term, b_dec and the skip connection kept), optionally with the attention patterns
  `freeze`: the model's own site interventions, not the module under test."""
  store = {}
  plt = isinstance(tc, T.PerLayerTranscoders)

  def read(x):
    store["f"] = jax.nn.relu(x[0] @ tc.W_enc[layer] + tc.b_enc[layer])  # ReLU transcoders
    return x

  def sub(t, y):
    w = tc.W_dec[layer] if plt else tc.W_dec[layer][:, t - layer]
    return y.at[0, 1:].add(-(store["f"][1:] @ w))

  iv = {T.sites_for(cfg, tc.input_hook, tc.output_hook).input_at(layer): read}
  for t in layers if layers is not None else ([layer] if plt else range(layer, L)):
    iv[f"blocks.{t}.hook_mlp_out"] = lambda y, t=t: sub(t, y)
  for name, value in (freeze or {}).items():
    iv[name] = lambda x, value=value: value
  run = jax.jit(lambda p: models.forward(cfg, p, jnp.asarray(TOKENS)[None], interventions=iv)[0])
  return np.asarray(run(params))


def _patterns(cfg, params):
  names = [f"blocks.{i}.attn.hook_pattern" for i in range(L)]
  run = jax.jit(lambda p: models.forward(cfg, p, jnp.asarray(TOKENS)[None], collect=names)[1])
  return run(params)


def test_identities(setup):
  """No interventions, features set to their own activations, or scaled by 1: the clean run."""
  cfg, params, tc, clean, acts = setup
  ref = np.asarray(_remove(cfg, params, tc, 0, freeze={}, layers=()))  # the model alone
  np.testing.assert_allclose(clean, ref, atol=1e-5, rtol=1e-5)
  assert (acts[:, 0] == 0).all() and (acts > 0).sum() > 20
  active = [tuple(int(i) for i in x) for x in np.argwhere(acts[:, 1:] > 0) + [0, 1, 0]]
  own = [(lay, p, f, float(acts[lay, p, f])) for lay, p, f in active]
  for freeze in (True, False):
    logits, a = FI.feature_intervention(cfg, params, tc, TOKENS, own, freeze_attention=freeze)
    np.testing.assert_allclose(logits, clean, atol=1e-5)
    np.testing.assert_allclose(a, acts, atol=1e-5)
  logits, _ = FI.feature_intervention(cfg, params, tc, TOKENS, FI.scaled(acts, active[:5], 1.0),
                                      freeze_attention=False)
  np.testing.assert_allclose(logits, clean, atol=1e-5)
  twice = [(0, 3, 5, 0.0), (0, 3, 5, 2.0)]  # the later intervention on an entry wins
  np.testing.assert_array_equal(FI.feature_intervention(cfg, params, tc, TOKENS, twice)[0],
                                FI.feature_intervention(cfg, params, tc, TOKENS, twice[1:])[0])


def test_zeroing_a_layer_removes_its_reconstruction(setup):
  """Every active feature of a layer set to 0 (one intervention: all positions after BOS, all
  features): the layer's MLP output loses its decoded features, the error term stays."""
  cfg, params, tc, clean, acts = setup
  zero = [(1, slice(1, None), list(range(F)), 0.0)]
  ours, a = FI.feature_intervention(cfg, params, tc, TOKENS, zero, freeze_attention=False)
  np.testing.assert_allclose(ours, _remove(cfg, params, tc, 1), atol=1e-4)
  np.testing.assert_allclose(a[1], acts[1], atol=1e-6)  # the activations the run computes
  assert np.abs(ours - clean).max() > 1e-2
  frozen = _patterns(cfg, params)
  ours, _ = FI.feature_intervention(cfg, params, tc, TOKENS, zero)
  np.testing.assert_allclose(ours, _remove(cfg, params, tc, 1, frozen),
                             atol=1e-4)


def test_frozen_and_free_attention_differ(setup):
  """A feature changed before the last position: earlier positions keep their logits either
  way, later ones differ between frozen and free attention."""
  cfg, params, tc, clean, _ = setup
  iv = [(0, 2, 5, 4.0)]
  frozen, _ = FI.feature_intervention(cfg, params, tc, TOKENS, iv)
  free, _ = FI.feature_intervention(cfg, params, tc, TOKENS, iv, freeze_attention=False)
  for logits in (frozen, free):
    np.testing.assert_allclose(logits[:2], clean[:2], atol=1e-5)
    assert np.abs(logits[2:] - clean[2:]).max() > 1e-2
  assert np.abs(frozen[-1] - free[-1]).max() > 1e-3


def test_direct_effects_are_linear(setup):
  """With every layer constrained (attention, norms and MLPs frozen) the logits move linearly in
  the value set; constraining only layer 1 ignores an intervention at layer 0."""
  cfg, params, tc, clean, acts = setup
  a0 = float(acts[0, 3, 5])
  d1, d2 = (np.asarray(FI.feature_intervention(
      cfg, params, tc, TOKENS, [(0, 3, 5, a0 + k)], constrained_layers=range(L))[0]) - clean
      for k in (1.0, 3.0))
  assert np.abs(d1).max() > 1e-2
  np.testing.assert_allclose(d2, 3 * d1, atol=1e-4)
  free = np.asarray(FI.feature_intervention(cfg, params, tc, TOKENS, [(0, 3, 5, a0 + 1.0)])[0])
  assert np.abs(free - clean - d1).max() > 1e-3  # the MLPs' response is not in the direct effect
  only1, _ = FI.feature_intervention(cfg, params, tc, TOKENS, [(0, 3, 5, a0 + 1.0)],
                                     constrained_layers=[1])
  np.testing.assert_allclose(only1, clean, atol=1e-5)


def test_cross_layer_transcoder(setup):
  """A CLT's layer-0 features zeroed: every layer's MLP output loses their decoded vectors."""
  cfg, params, _, _, _ = setup
  clt = _clt()
  clean, acts = FI.feature_intervention(cfg, params, clt, TOKENS, [])
  zero = [(0, slice(1, None), list(range(F)), 0.0)]
  ours, _ = FI.feature_intervention(cfg, params, clt, TOKENS, zero, freeze_attention=False)
  np.testing.assert_allclose(ours, _remove(cfg, params, clt, 0), atol=1e-4)
  own = [(1, 4, f, float(acts[1, 4, f])) for f in range(F)]
  np.testing.assert_allclose(FI.feature_intervention(cfg, params, clt, TOKENS, own)[0], clean,
                             atol=1e-5)


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_generate(setup):
  """No interventions: greedy decoding of the model. An open-ended slice with free attention: the
  run of the whole generated sequence with the same intervention."""
  cfg, params, tc, _, _ = setup
  n = 5
  toks, logits, acts = FI.feature_intervention_generate(cfg, params, tc, TOKENS, [],
                                                        max_new_tokens=n)
  run = jax.jit(lambda p, x: models.forward(cfg, p, x[None])[0])
  seq, want = np.zeros(len(TOKENS) + n, np.int32), []  # causal: later positions change nothing
  seq[:len(TOKENS)] = TOKENS
  for i in range(len(TOKENS), len(seq)):
    want.append(np.asarray(run(params, seq)[i - 1]))
    seq[i] = want[-1].argmax()
  np.testing.assert_array_equal(toks, seq)
  np.testing.assert_allclose(logits, np.stack(want), atol=1e-4)
  assert acts.shape == (L, len(TOKENS) + n - 1, F)
  iv = [(0, slice(3, None), 5, 6.0), (1, 2, 7, 3.0)]
  toks, logits, acts = FI.feature_intervention_generate(cfg, params, tc, TOKENS, iv,
                                                        max_new_tokens=n, freeze_attention=False)
  assert not np.array_equal(toks, seq)
  full, a = FI.feature_intervention(cfg, params, tc, toks[:-1], iv, freeze_attention=False)
  np.testing.assert_allclose(logits, full[len(TOKENS) - 1:], atol=1e-4)
  np.testing.assert_allclose(acts, a, atol=1e-4)
  key = jax.random.PRNGKey(0)
  sampled = FI.feature_intervention_generate(cfg, params, tc, TOKENS, iv, max_new_tokens=n,
                                             do_sample=True, key=key, top_k=3)[0]
  again = FI.feature_intervention_generate(cfg, params, tc, TOKENS, iv, max_new_tokens=n,
                                           do_sample=True, key=key, top_k=3)[0]
  np.testing.assert_array_equal(sampled, again)
  stop = int(toks[-2])
  end = len(TOKENS) + list(toks[len(TOKENS):]).index(stop) + 1
  done = []
  short = FI.feature_intervention_generate(cfg, params, tc, TOKENS, iv, max_new_tokens=n,
                                           freeze_attention=False, eos_token_id=stop,
                                           return_activations=False,
                                           progress=lambda i, total: done.append((i, total)))
  assert short[2] is None and done == [(i + 1, n) for i in range(end - len(TOKENS))]
  np.testing.assert_array_equal(short[0], toks[:end])
  assert short[1].shape == (end - len(TOKENS), cfg.d_vocab)


@pytest.mark.parametrize("iv,kw,match", [
    ([(2, 1, 0, 1.0)], {}, "layer 2 is not in"),
    ([(0, 7, 0, 1.0)], {}, "position 7 is past the prompt of 7"),
    ([(0, slice(1, 9), 0, 1.0)], {}, "past the prompt"),
    ([(0, 1, F, 1.0)], {}, f"feature {F} is not in"),
    ([(0, 1, 2)], {}, "must be \\(layer, position, feature, value\\)"),
    ([(0, [1, 2, 3], [1, 2], 1.0)], {}, "do not broadcast"),
    ([(0, 1, 1, 1.0)], {"constrained_layers": [0, 5]}, "constrained_layers"),
    ([(0, 1, 1, 1.0)], {"max_new_tokens": 0}, "max_new_tokens"),
    ([(0, 1, 1, 1.0)], {"max_new_tokens": 2, "do_sample": True}, "PRNG key"),
    ([(0, 1, 1, 1.0), (0, slice(5, None), 1, [1.0, 2.0])], {"max_new_tokens": 2},
     "intervention 1: .* do not broadcast together at a generated position"),
])
def test_bad_input_is_one_line(setup, iv, kw, match):
  cfg, params, tc, _, _ = setup
  fn = FI.feature_intervention_generate if "max_new_tokens" in kw else FI.feature_intervention
  with pytest.raises(T.TranscoderError, match=match) as e:
    fn(cfg, params, tc, TOKENS, iv, **kw)
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Equality with circuit-tracer 0.5.0.

DRIVER = os.path.join(os.path.dirname(__file__), "intervention_driver.py")
CT_PROMPT = [0, 5, 17, 9, 33, 2, 41, 9]
# circuit-tracer generates from text only with free attention: the driver's tokenizer reads "t1"
# (a special token) inside "t17", so the prompts of generation avoid ids 10-19.
GEN_PROMPT = [0, 5, 27, 9, 33, 2, 41, 9]
CT_F = 48
CT_TRANSCODERS = {  # name: (model, kind, jumprelu, skip, input hook)
    "gpt2_jump_skip": ("gpt2", "plt", True, True, "mlp.hook_in"),
    "llama_relu_skip": ("llama", "plt", False, True, "ln2.hook_normalized"),
    "gpt2_clt": ("gpt2", "clt", False, False, "hook_resid_mid"),
}
SETS = [(1, 3, list(range(CT_F)), 0.0), (0, {"slice": [2, None]}, 5, 2.5),
        (2, [1, 4], [7, 9], [1.0, -0.5]), (0, -1, 11, 3.0), (1, 5, 7, 1.5)]
OPEN = [(0, {"slice": [1, None]}, 5, 2.5), (1, 2, 7, 1.0), (2, {"slice": [6, None]}, 9, 2.0)]
OPTIONS = {  # name: (freeze_attention, constrained_layers, apply_activation_function)
    "frozen": (True, None, True), "free": (False, None, True), "direct": (True, [0, 3], True),
    "constrained": (False, [1, 3], True), "pre": (False, None, False)}
CT_CASES = {
    **{f"{tc}_{opt}": (tc, SETS, opt, None) for tc in CT_TRANSCODERS for opt in OPTIONS},
    **{f"{tc}_gen_{opt}": (tc, OPEN, opt, 4) for tc in CT_TRANSCODERS
       for opt in ("frozen", "free")},
    "gpt2_jump_skip_gen_pre": ("gpt2_jump_skip", OPEN, "pre", 3),
    "gpt2_jump_skip_gen_none": ("gpt2_jump_skip", [], "free", 4),
}


def _ct_clt(rng, d: int, n_layers: int) -> T.CrossLayerTranscoder:
  def a(*s, scale=0.3):
    return jnp.asarray(rng.normal(size=s) * scale, jnp.float32)

  return T.CrossLayerTranscoder(
      a(n_layers, d, CT_F, scale=d ** -0.5), a(n_layers, CT_F) - 0.6,
      tuple(a(CT_F, n_layers - s, d) for s in range(n_layers)), a(n_layers, d, scale=0.1),
      input_hook="hook_resid_mid", output_hook="hook_mlp_out")


def _ours_interventions(spec):
  def pos(p):
    return slice(*p["slice"]) if isinstance(p, dict) else p

  return [(layer, pos(p), f, np.asarray(v, np.float32)) for layer, p, f, v in spec]


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
  """Write the transcoders and cases, run the driver once; return (dir, transcoders, outputs)."""
  if not ct_venv.have_circuit_tracer():
    pytest.skip(f"circuit-tracer is not installed at {ct_venv.PYTHON}")
  base = tmp_path_factory.mktemp("interventions")
  rng = np.random.default_rng(0)
  tcs = {}
  for name, (m, kind, jump, skip, hook) in CT_TRANSCODERS.items():
    d, n_layers = MODELS[m]["d_model"], MODELS[m]["n_layers"]
    if kind == "clt":
      tcs[name] = _ct_clt(rng, d, n_layers)
      T.save_clt(tcs[name], base / name)
    else:
      tcs[name] = _transcoders(rng, d, n_layers, jump, skip, hook)
      T.save_transcoder_set(tcs[name], base / name)
  cases = {}
  for name, (tc, ivs, opt, n_new) in CT_CASES.items():
    m, kind, _, _, hook = CT_TRANSCODERS[tc]
    freeze, constrained, apply_fn = OPTIONS[opt]
    cases[name] = {"model": m, "transcoders": tc, "kind": kind, "hooks": [hook, "hook_mlp_out"],
                   "prompt": GEN_PROMPT if n_new else CT_PROMPT, "interventions": ivs,
                   "freeze_attention": freeze, "constrained": constrained,
                   "apply_activation_function": apply_fn, "max_new_tokens": n_new}
  with open(base / "cases.json", "w") as fh:
    json.dump({"models": MODELS, "cases": cases}, fh)
  ref = ct_venv.run_driver(DRIVER, base, "out.npz")
  return base, tcs, ref


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CT_CASES))
def test_equals_circuit_tracer(ct, case):
  base, tcs, ref = ct
  tc_name, ivs, opt, n_new = CT_CASES[case]
  m = models.from_pretrained(str(base / "models" / CT_TRANSCODERS[tc_name][0]))
  tc = tcs[tc_name]
  freeze, constrained, apply_fn = OPTIONS[opt]
  kw = dict(freeze_attention=freeze, apply_activation_function=apply_fn,
            constrained_layers=range(*constrained) if constrained else None)
  prompt = np.array(GEN_PROMPT if n_new else CT_PROMPT)
  if n_new:
    toks, logits, acts = FI.feature_intervention_generate(
        m.cfg, m.params, tc, prompt, _ours_interventions(ivs), max_new_tokens=n_new,
        **kw)
    np.testing.assert_array_equal(toks, ref[case + "/tokens"])
  else:
    logits, acts = FI.feature_intervention(m.cfg, m.params, tc, prompt, _ours_interventions(ivs),
                                           **kw)
  clean = FI.feature_intervention(m.cfg, m.params, tc, prompt, [])[0]
  rl, ra = _rel(logits, ref[case + "/logits"]), _rel(acts, ref[case + "/activations"])
  print(case, "max |diff| / max |ref|: logits", rl, "activations", ra)
  assert rl <= 1e-4 and ra <= 1e-4, (rl, ra)
  if ivs:  # the interventions did something
    moved = logits[0] - clean[-1] if n_new else logits - clean
    assert np.abs(np.asarray(moved)).max() > 1e-3
