"""Tests of the plain-PyTorch graph-form GPT-2 oracle and of the eager-torch EAP-IG baseline.

The oracle is checked against Hugging Face's GPT-2 computed through its own modules (hooks only read
or patch HF activations), so a bug in the oracle's graph form cannot hide behind itself.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks.torch_baseline import BaselineInputError, torch_eap_ig_inputs  # noqa: E402
from tests.attribution.torch_oracle import (  # noqa: E402
  GPT2GraphOracle,
  OracleInputError,
  TaskBatch,
  load_eap_csv_batch,
  random_task_batch,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
IOI_CSV = SHARED / "data" / "eap-ig" / "ioi" / "gpt2.csv"
TOKENIZER = SHARED / "models" / "gpt2-tokenizer" / "tokenizer.json"
HAVE_SHARED = IOI_CSV.exists() and TOKENIZER.exists()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def hf():
  """A random-init GPT-2 with the real vocabulary but tiny width (float32, eval mode)."""
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                initializer_range=0.1)
  return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def hf64(hf):
  return copy.deepcopy(hf).double()


@pytest.fixture(scope="module")
def oracle(hf):
  return GPT2GraphOracle(hf)


@pytest.fixture(scope="module", params=["random", "ioi"])
def data(request) -> TaskBatch:
  if request.param == "ioi":
    if not HAVE_SHARED:
      pytest.skip("../shared (EAP-IG IOI data, GPT-2 tokenizer) is absent")
    return load_eap_csv_batch(IOI_CSV, TOKENIZER, n=16)
  return random_task_batch(50257, n=12, pos=10, seed=1)


def args(b: TaskBatch):
  return b.clean, b.corrupted, b.mask, b.last, b.correct, b.incorrect


_exact_cache: dict = {}


def exact(oracle, b):
  key = id(b)
  if key not in _exact_cache:
    _exact_cache[key] = oracle.exact_scores(*args(b))
  return _exact_cache[key]


# ---------------------------------------------------------------------------------------------
# HF-side helpers (hooks only capture or patch HF's own activations).


def hf_logit_diff(logits, b: TaskBatch):
  rows = torch.arange(logits.shape[0])
  lg = logits[rows, b.last]
  return (lg[rows, b.correct] - lg[rows, b.incorrect]).mean()


def hf_capture(model, tokens, mask):
  """Run HF, capturing embeddings, per-layer c_proj inputs, ln_2 inputs, MLP outputs, ln_f input."""
  cap = {}
  hooks = []
  t = model.transformer
  for layer, blk in enumerate(t.h):
    hooks.append(blk.attn.c_proj.register_forward_pre_hook(
        lambda m, a, layer=layer: cap.__setitem__(("z", layer), a[0].detach())))
    hooks.append(blk.ln_2.register_forward_pre_hook(
        lambda m, a, layer=layer: cap.__setitem__(("mid", layer), a[0].detach())))
    hooks.append(blk.mlp.register_forward_hook(
        lambda m, a, o, layer=layer: cap.__setitem__(("mlp", layer), o.detach())))
    hooks.append(blk.attn.c_attn.register_forward_hook(
        lambda m, a, o, layer=layer: cap.__setitem__(("qkv", layer), o.detach())))
  hooks.append(t.ln_f.register_forward_pre_hook(
      lambda m, a: cap.__setitem__("final", a[0].detach())))
  try:
    with torch.no_grad():
      out = model(tokens, attention_mask=mask, output_hidden_states=True)
  finally:
    for h in hooks:
      h.remove()
  cap["emb"] = out.hidden_states[0].detach()
  cap["resid_pre"] = [h.detach() for h in out.hidden_states[:-1]]
  cap["logits"] = out.logits.detach()
  return cap


def hf_unembed(model, final):
  with torch.no_grad():
    return model.lm_head(model.transformer.ln_f(final))


def head_out(model, z, layer, head):
  """Head `head`'s output z_h @ W_O[h] (no bias) from HF's merged c_proj input."""
  dh = model.config.n_embd // model.config.n_head
  w = model.transformer.h[layer].attn.c_proj.weight
  return z[..., head * dh:(head + 1) * dh] @ w[head * dh:(head + 1) * dh]


# ---------------------------------------------------------------------------------------------
# Forward.


def test_forward_matches_hf(hf, oracle, data):
  with torch.no_grad():
    ref = hf(data.clean, attention_mask=data.mask).logits
  got = oracle.forward(data.clean, data.mask).float()
  real = data.mask.bool()
  assert got.shape == ref.shape
  torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)
  # A float32 oracle matches as well.
  got32 = GPT2GraphOracle(hf, dtype=torch.float32).forward(data.clean, data.mask)
  torch.testing.assert_close(got32[real], ref[real], atol=1e-4, rtol=1e-4)


def test_all_zero_weights_is_corrupted_run(hf, oracle, data):
  abl = oracle.senders(data.corrupted, data.mask)
  w0 = torch.zeros(oracle.n_senders, oracle.n_receivers, dtype=torch.float64)
  got = oracle.forward(data.clean, data.mask, w0, abl)
  with torch.no_grad():
    ref = hf(data.corrupted, attention_mask=data.mask).logits.double()
  real = data.mask.bool()
  torch.testing.assert_close(got, oracle.forward(data.corrupted, data.mask), atol=1e-10, rtol=0)
  torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


def test_all_one_weights_ignore_ablated(oracle, data):
  abl = torch.randn(*data.clean.shape, oracle.n_senders, oracle.d_model, dtype=torch.float64)
  w1 = torch.ones(oracle.n_senders, oracle.n_receivers, dtype=torch.float64)
  torch.testing.assert_close(oracle.forward(data.clean, data.mask, w1, abl),
                             oracle.forward(data.clean, data.mask), atol=1e-10, rtol=0)


def test_ablating_all_input_edges_is_corrupted_run(oracle, data):
  # Every receiver reads the input directly, so cutting all of its edges corrupts the whole run.
  abl = oracle.senders(data.corrupted, data.mask)
  w = torch.ones(oracle.n_senders, oracle.n_receivers, dtype=torch.float64)
  w[0] = 0.0
  torch.testing.assert_close(oracle.forward(data.clean, data.mask, w, abl),
                             oracle.forward(data.corrupted, data.mask), atol=1e-10, rtol=0)


def test_index_layout(oracle):
  H, L = oracle.n_heads, oracle.n_layers
  assert (oracle.n_senders, oracle.n_receivers) == (1 + L * (H + 1), L * (3 * H + 1) + 1)
  assert oracle.head_sender(1, 2) == 1 + (H + 1) + 2 and oracle.mlp_sender(0) == 1 + H
  assert oracle.head_receiver(1, 3, "k") == (3 * H + 1) + H + 3
  assert oracle.mlp_receiver(1) == (3 * H + 1) + 3 * H
  v = oracle.valid_edges()
  # Layer 0: only the input feeds q/k/v; the MLP of a layer reads that layer's heads.
  assert v[:, oracle.head_receiver(0, 0, "q")].sum() == 1
  assert v[oracle.head_sender(0, 3), oracle.mlp_receiver(0)]
  assert not v[oracle.mlp_sender(0), oracle.mlp_receiver(0)]
  assert not v[oracle.head_sender(1, 0), oracle.head_receiver(1, 1, "v")]
  assert v[:, oracle.logits_receiver].all()
  # Edge count: layer-0 q/k/v, layer-1 q/k/v, MLP 0, MLP 1, logits.
  expect = sum(oracle.n_upstream(r) for r in range(oracle.n_receivers))
  assert v.sum() == expect == (3 * H * (1 + (1 + H + 1)) + (1 + H) + (1 + H + 1 + H)
                               + (1 + 2 * (H + 1)))


def test_bad_input_raises(oracle, data):
  w = torch.ones(3, 3)
  with pytest.raises(OracleInputError, match="edge_weights"):
    oracle.forward(data.clean, data.mask, w, torch.zeros(1))
  with pytest.raises(OracleInputError, match="attention_mask"):
    oracle.forward(data.clean, data.mask[:, :-1])
  with pytest.raises(OracleInputError, match="equal shapes"):
    oracle.eap_scores(data.clean, data.corrupted[:, :-1], data.mask, data.last, data.correct,
                      data.incorrect)


# ---------------------------------------------------------------------------------------------
# Exact scores.


def test_exact_scores_equal_manual_hf_evaluation(hf64, oracle, data):
  """Exact scores of five edges equal the metric recomputed by patching HF's own activations."""
  b = data
  c = hf_capture(hf64, b.clean, b.mask)
  k = hf_capture(hf64, b.corrupted, b.mask)
  base = hf_logit_diff(c["logits"], b)
  d = hf64.config.n_embd
  dh = d // hf64.config.n_head
  L = hf64.config.n_layer
  manual = {}

  # (input -> logits and input -> MLP have no effect: prompts differ before the last token.)
  # head (1, 2) -> logits.
  x = c["final"] - head_out(hf64, c[("z", 1)], 1, 2) + head_out(hf64, k[("z", 1)], 1, 2)
  manual[(oracle.head_sender(1, 2), oracle.logits_receiver)] = (
      hf_logit_diff(hf_unembed(hf64, x), b) - base)

  # head (0, 3) -> MLP of the last layer.
  blk = hf64.transformer.h[L - 1]
  delta = head_out(hf64, k[("z", 0)], 0, 3) - head_out(hf64, c[("z", 0)], 0, 3)
  with torch.no_grad():
    mlp_new = blk.mlp(blk.ln_2(c[("mid", L - 1)] + delta))
  x = c["final"] - c[("mlp", L - 1)] + mlp_new
  manual[(oracle.head_sender(0, 3), oracle.mlp_receiver(L - 1))] = (
      hf_logit_diff(hf_unembed(hf64, x), b) - base)

  def patched_run(layer, new_qkv_fn):
    h = hf64.transformer.h[layer].attn.c_attn.register_forward_hook(
        lambda m, a, o: new_qkv_fn(o))
    try:
      with torch.no_grad():
        return hf_logit_diff(hf64(b.clean, attention_mask=b.mask).logits, b) - base
    finally:
      h.remove()

  # input -> k of head (0, 1): layer 0 reads only the input, so that key is the corrupted run's.
  sl = slice(d + 1 * dh, d + 2 * dh)

  def patch_k(o):
    o = o.clone()
    o[..., sl] = k[("qkv", 0)][..., sl]
    return o

  manual[(0, oracle.head_receiver(0, 1, "k"))] = patched_run(0, patch_k)

  # MLP 0 -> v of head (1, 2): v of that head is computed from a residual with MLP 0 corrupted.
  blk1 = hf64.transformer.h[1]
  with torch.no_grad():
    alt = blk1.attn.c_attn(blk1.ln_1(c["resid_pre"][1] - c[("mlp", 0)] + k[("mlp", 0)]))
  sl_v = slice(2 * d + 2 * dh, 2 * d + 3 * dh)

  def patch_v(o):
    o = o.clone()
    o[..., sl_v] = alt[..., sl_v]
    return o

  manual[(oracle.mlp_sender(0), oracle.head_receiver(1, 2, "v"))] = patched_run(1, patch_v)

  ex = exact(oracle, b)
  for (s, r), want in manual.items():
    assert abs(want.item()) > 1e-7, f"edge {(s, r)} has no effect; the test would be vacuous"
    np.testing.assert_allclose(ex[s, r], want.item(), rtol=1e-6, atol=1e-10,
                               err_msg=f"edge {(s, r)}")


def test_exact_scores_zero_on_invalid_edges(oracle, data):
  ex = exact(oracle, data)
  v = oracle.valid_edges()
  assert np.all(ex[~v] == 0)
  # The prompts agree at the last token, and in the last layer the queries, the MLP and the logits
  # only matter at the last token: edges from the input into those have no effect (up to float64
  # rounding). Every other valid edge has some effect.
  rows = torch.arange(data.clean.shape[0])
  assert (data.clean[rows, data.last] == data.corrupted[rows, data.last]).all()
  top = oracle.n_layers - 1
  silent = [(0, oracle.head_receiver(top, h, "q")) for h in range(oracle.n_heads)]
  silent += [(0, oracle.mlp_receiver(top)), (0, oracle.logits_receiver)]
  for s, r in silent:
    assert abs(ex[s, r]) < 1e-12
  assert np.sum(np.abs(ex[v]) > 1e-12) == v.sum() - len(silent)


# ---------------------------------------------------------------------------------------------
# EAP and EAP-IG.


def test_eap_into_logits_is_hf_directional_derivative(hf64, oracle, data):
  """sum_s EAP[s, logits] = (final_corrupt - final_clean) . dm/dfinal at the clean run (HF modules).
  """
  b = data
  c = hf_capture(hf64, b.clean, b.mask)
  k = hf_capture(hf64, b.corrupted, b.mask)
  x = c["final"].clone().requires_grad_(True)
  m = hf_logit_diff(hf64.lm_head(hf64.transformer.ln_f(x)), b)
  (g,) = torch.autograd.grad(m, x)
  want = ((k["final"] - c["final"]) * g).sum().item()
  eap = oracle.eap_scores(*args(b))
  np.testing.assert_allclose(eap[:, oracle.logits_receiver].sum(), want, rtol=1e-7, atol=1e-12)


def hf_input_grad(model, b: TaskBatch, tokens_emb):
  """dm/d(token embeddings) from HF at the given token embeddings (position embeddings added by HF).
  """
  x = tokens_emb.clone().requires_grad_(True)
  m = hf_logit_diff(model(inputs_embeds=x, attention_mask=b.mask).logits, b)
  (g,) = torch.autograd.grad(m, x)
  return g


def test_eap_input_row_is_hf_input_gradient(hf64, oracle, data):
  """sum_r EAP[input, r] = (emb_corrupt - emb_clean) . dm/d(embedding) from HF's own backward."""
  b = data
  wte = hf64.transformer.wte.weight.detach()
  g = hf_input_grad(hf64, b, wte[b.clean])
  want = ((wte[b.corrupted] - wte[b.clean]) * g).sum().item()
  eap = oracle.eap_scores(*args(b))
  np.testing.assert_allclose(eap[0].sum(), want, rtol=1e-7, atol=1e-12)


def test_eap_ig_input_row_is_hf_riemann_sum(hf64, oracle, data):
  """sum_r EAP-IG[input, r] = (corrupt - clean) . mean_k dm/dx at x = corrupt + k/m (clean -
  corrupt)."""
  b = data
  steps = 4
  wte = hf64.transformer.wte.weight.detach()
  e_c, e_k = wte[b.clean], wte[b.corrupted]
  g = sum(hf_input_grad(hf64, b, e_k + (j / steps) * (e_c - e_k)) for j in range(steps)) / steps
  want = ((e_k - e_c) * g).sum().item()
  ig = oracle.eap_ig_inputs_scores(*args(b), steps=steps)
  np.testing.assert_allclose(ig[0].sum(), want, rtol=1e-7, atol=1e-12)


def test_eap_ig_one_step_is_eap_at_the_corrupted_input(oracle, data):
  # alpha_0 = 0: the gradient is taken at the corrupted run, i.e. EAP with the roles swapped.
  b = data
  ig1 = oracle.eap_ig_inputs_scores(*args(b), steps=1)
  swapped = oracle.eap_scores(b.corrupted, b.clean, b.mask, b.last, b.correct, b.incorrect)
  np.testing.assert_allclose(ig1, -swapped, rtol=1e-9, atol=1e-14)


def test_eap_ig_completeness_converges_to_total_effect(oracle, data):
  """IG completeness: the input node's scores sum to m(corrupt) - m(clean) as steps grow."""
  b = data
  total = (oracle.metric(b.corrupted, b.mask, b.last, b.correct, b.incorrect).mean()
           - oracle.metric(b.clean, b.mask, b.last, b.correct, b.incorrect).mean()).item()
  assert abs(total) > 1e-4
  err = {m: abs(oracle.eap_ig_inputs_scores(*args(b), steps=m)[0].sum() - total)
         for m in (2, 64)}
  eap_err = abs(oracle.eap_scores(*args(b))[0].sum() - total)
  assert err[64] < 0.02 * abs(total)
  assert err[64] < err[2]
  assert err[64] < eap_err


def test_eap_ig_many_steps_tracks_exact_better_than_eap(oracle, data):
  """On this tiny random model, EAP-IG (m=32) correlates with exact at least as well as EAP."""
  b = data
  v = oracle.valid_edges()
  ex = exact(oracle, b)[v]
  eap = oracle.eap_scores(*args(b))[v]
  ig = oracle.eap_ig_inputs_scores(*args(b), steps=32)[v]
  r_eap, r_ig = np.corrcoef(eap, ex)[0, 1], np.corrcoef(ig, ex)[0, 1]
  assert r_ig > 0.9
  assert r_ig >= r_eap - 1e-3


# ---------------------------------------------------------------------------------------------
# The eager-torch baseline.


@pytest.mark.parametrize("batch_size,full_logits", [(16, False), (5, True)])
def test_torch_baseline_equals_oracle(hf, oracle, data, batch_size, full_logits):
  b = data
  want = oracle.eap_ig_inputs_scores(*args(b), steps=3)
  got = torch_eap_ig_inputs(hf, *args(b), steps=3, batch_size=batch_size,
                            full_logits=full_logits)
  assert got.shape == want.shape and got.dtype == torch.float32
  got = got.double().numpy()
  scale = np.abs(want).max()
  assert scale > 0
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
  assert np.all(got[~oracle.valid_edges()] == 0)
  assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99999


def test_torch_baseline_bad_input(hf, data):
  b = data
  with pytest.raises(BaselineInputError, match="equal"):
    torch_eap_ig_inputs(hf, b.clean, b.corrupted[:, :-1], b.mask, b.last, b.correct, b.incorrect)
  with pytest.raises(BaselineInputError, match="steps"):
    torch_eap_ig_inputs(hf, *args(b), steps=0)
