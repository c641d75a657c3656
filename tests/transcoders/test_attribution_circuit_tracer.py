"""`attribute_graph` equals circuit-tracer's `attribute` (0.5.0, TransformerLens backend) on the
same random models, transcoders and prompts: a GPT-2-style model and a Llama-style one with GQA,
RoPE and RMSNorm; skip and JumpReLU transcoders, inputs at `mlp.hook_in` and `ln2.hook_normalized`;
several prompts; all features and a `max_feature_nodes` budget.

circuit-tracer runs in its own virtual environment (`attribution_driver.py`, which builds the models
with transformers and saves them for both sides); the tests skip without it.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp import transcoders as T
from tests.transcoders import ct_venv

DRIVER = os.path.join(os.path.dirname(__file__), "attribution_driver.py")
VOCAB = 64
MODELS = {
    "gpt2": dict(kind="gpt2", d_model=32, n_layers=3, n_heads=4, vocab=VOCAB, n_ctx=32, seed=0,
                 scale=0.15),
    "llama": dict(kind="llama", d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=48,
                  vocab=VOCAB, n_ctx=32, seed=1, scale=0.15),
}
TRANSCODERS = {  # name: (model, jumprelu, skip, input hook)
    "gpt2_jump_skip": ("gpt2", True, True, "mlp.hook_in"),
    "gpt2_relu": ("gpt2", False, False, "mlp.hook_in"),
    "llama_relu_skip": ("llama", False, True, "ln2.hook_normalized"),
    "llama_jump": ("llama", True, False, "mlp.hook_in"),
}
PROMPTS = [[0, 5, 17, 9, 33, 2, 41, 9], [0, 12, 7, 60, 3, 3, 19], [0, 44, 8, 21, 30, 5, 5, 27, 11]]
CASES = {  # name: (transcoders, settings)
    **{name: (name, dict(max_n_logits=10, desired_logit_prob=0.95, batch_size=32))
       for name in TRANSCODERS},
    "gpt2_budget": ("gpt2_jump_skip", dict(max_n_logits=5, desired_logit_prob=0.8, batch_size=8,
                                           max_feature_nodes=20)),
    "llama_budget": ("llama_relu_skip", dict(max_n_logits=3, desired_logit_prob=0.95,
                                             batch_size=8, max_feature_nodes=16)),
}
F = 48

pytestmark = pytest.mark.skipif(not ct_venv.have_circuit_tracer(),
                                reason=f"circuit-tracer is not installed at {ct_venv.PYTHON}")


def _transcoders(rng, d: int, L: int, jump: bool, skip: bool, hook: str) -> T.PerLayerTranscoders:
  def a(*s, scale=1.0):
    return jnp.asarray(rng.normal(size=s) * scale, jnp.float32)

  return T.PerLayerTranscoders(
      a(L, d, F, scale=d ** -0.5), a(L, F, scale=0.3) - 0.6, a(L, F, d, scale=0.3),
      a(L, d, scale=0.1),
      threshold=jnp.asarray(rng.uniform(0.0, 0.5, (L, F)), jnp.float32) if jump else None,
      W_skip=a(L, d, d, scale=0.2) if skip else None, input_hook=hook,
      output_hook="hook_mlp_out")


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
  """Write the transcoders and cases, run the driver once; return (dir, transcoders, graphs)."""
  base = tmp_path_factory.mktemp("attribution")
  rng = np.random.default_rng(0)
  tcs = {}
  for name, (m, jump, skip, hook) in TRANSCODERS.items():
    tcs[name] = _transcoders(rng, MODELS[m]["d_model"], MODELS[m]["n_layers"], jump, skip, hook)
    T.save_transcoder_set(tcs[name], base / name)
  cases = {name: {"model": TRANSCODERS[tc][0], "transcoders": tc, "prompts": PROMPTS, **kw}
           for name, (tc, kw) in CASES.items()}
  with open(base / "cases.json", "w") as fh:
    json.dump({"models": MODELS, "cases": cases}, fh)
  ref = ct_venv.run_driver(DRIVER, base, "graphs.npz")
  return base, tcs, ref


def _compare(ours: T.AttributionGraph, ref: dict, key: str) -> tuple[float, float]:
  """Check the equality targets; return (Pearson, max |diff| / max |A|)."""
  np.testing.assert_array_equal(ours.input_tokens, ref[key + "/input_tokens"])
  np.testing.assert_array_equal(ours.logit_tokens, ref[key + "/logit_tokens"])
  np.testing.assert_allclose(ours.logit_probabilities, ref[key + "/logit_probabilities"],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(ours.active_features, ref[key + "/active_features"])
  np.testing.assert_allclose(ours.activation_values, ref[key + "/activation_values"], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(ours.selected_features, ref[key + "/selected_features"])
  a, b = ours.adjacency, ref[key + "/adjacency"]
  assert a.shape == b.shape
  pearson = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
  rel = float(np.abs(a - b).max() / np.abs(b).max())
  assert pearson >= 0.9999999 and rel <= 1e-5, (pearson, rel)  # the issue asks 0.9999, 1e-3
  return pearson, rel


@pytest.mark.parametrize("case", list(CASES))
def test_attribute_graph_equals_circuit_tracer(ct, case):
  base, tcs, ref = ct
  tc_name, kw = CASES[case]
  m = models.from_pretrained(str(base / "models" / TRANSCODERS[tc_name][0]))
  tc = T.load(base / tc_name, m.cfg)
  figures = []
  for i, prompt in enumerate(PROMPTS):
    g = T.attribute_graph(m.cfg, m.params, tc, np.array(prompt), **kw)
    assert g.n_features > 0 and np.abs(g.adjacency[:g.n_features]).max() > 0
    figures.append(_compare(g, ref, f"{case}/{i}"))
  print(case, "Pearson >=", min(p for p, _ in figures), "max |diff| / max |A| <=",
        max(r for _, r in figures))
