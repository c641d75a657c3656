"""`attribute_graph` equals circuit-tracer's `attribute` (0.5.0, TransformerLens backend) on more
models and transcoders than `test_attribution_circuit_tracer.py`: a Gemma-2-style model (post-norms,
(1 + w) RMSNorm, GQA, attention and final logit soft-caps, a sliding window, embeddings scaled by
sqrt(d_model), `query_pre_attn_scalar`), cross-layer transcoders (ReLU and JumpReLU) on the
GPT-2-style model, and the Llama-style model's missing transcoder kinds (JumpReLU with a skip
connection, ReLU without); three prompts each, every feature and a `max_feature_nodes` budget; and
the pruned graph.json (`write_graph_files` against `create_graph_files`) of every graph of four
cases.

Gemma-2's final logit soft-cap: both sides attribute the logits before the soft-cap, and both take
the targets' probabilities from the model's own soft-capped logits by default (`gemma2_softcap`
compares the two defaults). Inside `model.zero_softcap()` circuit-tracer takes them from the
cap-free logits; the `zero_softcap` cases give `attribute_graph` the salient logits of those.

circuit-tracer runs once, in its own virtual environment (`attribution_driver.py`); the tests skip
without it.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp import transcoders as T
from jaxinterp.models.transformer import forward, unembedding
from tests.transcoders import ct_venv
from tests.transcoders.test_attribution_circuit_tracer import (
  DRIVER,
  MODELS,
  PROMPTS,
  F,
  _compare,
  _transcoders,
)

GEMMA = dict(kind="gemma2", d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=48,
             vocab=MODELS["gpt2"]["vocab"], n_ctx=32, seed=2, scale=0.15,
             query_pre_attn_scalar=12, sliding_window=4, attn_softcap=3.0, final_softcap=4.0)
SPECS = {"gemma2": GEMMA, "gpt2": MODELS["gpt2"], "llama": MODELS["llama"]}
TRANSCODERS = {  # name: (model, kind, jumprelu, skip, input hook)
    "gemma2_jump_skip": ("gemma2", "plt", True, True, "ln2.hook_normalized"),
    "gemma2_relu": ("gemma2", "plt", False, False, "mlp.hook_in"),
    "gpt2_clt_relu": ("gpt2", "clt", False, False, "hook_resid_mid"),
    "gpt2_clt_jump": ("gpt2", "clt", True, False, "ln2.hook_normalized"),
    "llama_jump_skip": ("llama", "plt", True, True, "mlp.hook_in"),
    "llama_relu": ("llama", "plt", False, False, "ln2.hook_normalized"),
}
ALL = dict(max_n_logits=10, desired_logit_prob=0.95, batch_size=32)
BUDGET = dict(max_n_logits=5, desired_logit_prob=0.8, batch_size=8, max_feature_nodes=16)
JSON = (0.8, 0.98)  # graph.json's node and edge thresholds
CASES = {  # name: (transcoders, settings, driver options)
    "gemma2_jump_skip": ("gemma2_jump_skip", ALL, dict(zero_softcap=True, graph_json=JSON)),
    "gemma2_relu": ("gemma2_relu", ALL, dict(zero_softcap=True)),
    "gemma2_budget": ("gemma2_jump_skip", BUDGET, dict(zero_softcap=True, graph_json=JSON)),
    "gemma2_softcap": ("gemma2_relu", ALL, {}),
    "gpt2_clt_relu": ("gpt2_clt_relu", ALL, dict(graph_json=JSON)),
    "gpt2_clt_jump": ("gpt2_clt_jump", ALL, {}),
    "gpt2_clt_budget": ("gpt2_clt_relu", BUDGET, dict(graph_json=JSON)),
    "llama_jump_skip": ("llama_jump_skip", ALL, {}),
    "llama_relu": ("llama_relu", ALL, {}),
}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ct_venv.have_circuit_tracer(),
                                 reason=f"circuit-tracer is not installed at {ct_venv.PYTHON}")]


def _clt(rng, d: int, L: int, jump: bool, hook: str) -> T.CrossLayerTranscoder:
  """Random cross-layer transcoders (no skip connection: circuit-tracer's files hold none)."""
  def a(*s, scale=0.3):
    return jnp.asarray(rng.normal(size=s) * scale, jnp.float32)

  return T.CrossLayerTranscoder(
      a(L, d, F, scale=d ** -0.5), a(L, F) - 0.6, tuple(a(F, L - s, d) for s in range(L)),
      a(L, d, scale=0.1),
      threshold=jnp.asarray(rng.uniform(0.0, 0.5, (L, F)), jnp.float32) if jump else None,
      input_hook=hook, output_hook="hook_mlp_out")


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
  """Write the transcoders and cases, run the driver once; return (dir, graphs)."""
  base = tmp_path_factory.mktemp("attribution_more")
  rng = np.random.default_rng(1)
  for name, (m, kind, jump, skip, hook) in TRANSCODERS.items():
    d, L = SPECS[m]["d_model"], SPECS[m]["n_layers"]
    if kind == "clt":
      T.save_clt(_clt(rng, d, L, jump, hook), base / name)
    else:
      T.save_transcoder_set(_transcoders(rng, d, L, jump, skip, hook), base / name)
  cases = {name: {"model": TRANSCODERS[tc][0], "transcoders": tc, "prompts": PROMPTS, **kw, **opt}
           for name, (tc, kw, opt) in CASES.items()}
  with open(base / "cases.json", "w") as fh:
    json.dump({"models": SPECS, "cases": cases}, fh)
  ref = ct_venv.run_driver(DRIVER, base, "graphs.npz")
  return base, ref


def _salient(cfg: models.ModelConfig, params, tokens: np.ndarray,
             kw: dict) -> T.targets.LogitTargets:
  """The salient logits of the model's last-position logits (soft-capped if `cfg` has the cap,
  cap-free for a `cfg` without it: as circuit-tracer inside `zero_softcap()`)."""
  logits = jax.jit(forward, static_argnums=0)(cfg, params, jnp.asarray(tokens)[None])[0, -1]
  return T.targets.salient_logits(np.asarray(logits, np.float32),
                                  np.asarray(unembedding(cfg, params), np.float32),
                                  kw["max_n_logits"], kw["desired_logit_prob"])


def _same_graph_json(mine: dict, theirs: dict, scale: float) -> tuple[int, int, float]:
  """The same nodes (ids, fields; influence and activation within 1e-4) and links (endpoints;
  weights within 1e-5 of the graph's max |A|); returns (nodes, links, max |weight difference| /
  max |A|)."""
  assert [n["node_id"] for n in mine["nodes"]] == [n["node_id"] for n in theirs["nodes"]]
  for a, b in zip(mine["nodes"], theirs["nodes"], strict=True):
    assert list(a) == list(b), a["node_id"]
    for k in b:
      if isinstance(b[k], float) or isinstance(a[k], float):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["node_id"], k)
      else:
        assert a[k] == b[k], (a["node_id"], k)
  assert [(e["source"], e["target"]) for e in mine["links"]] == [
      (e["source"], e["target"]) for e in theirs["links"]]
  a, b = (np.array([e["weight"] for e in x["links"]]) for x in (mine, theirs))
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  return len(theirs["nodes"]), len(theirs["links"]), float(np.abs(a - b).max() / scale)


@pytest.mark.parametrize("case", list(CASES))
def test_attribute_graph_equals_circuit_tracer(ct, case, tmp_path):
  base, ref = ct
  tc_name, kw, opt = CASES[case]
  m = models.from_pretrained(str(base / "models" / TRANSCODERS[tc_name][0]))
  tc = T.load(base / tc_name, m.cfg)
  figures, sizes = [], []
  for i, prompt in enumerate(PROMPTS):
    toks = np.array(prompt)
    targets = None  # attribute_graph's default: the soft-capped probabilities
    if m.cfg.final_logit_softcap:
      free = _salient(dataclasses.replace(m.cfg, final_logit_softcap=None), m.params, toks, kw)
      if opt.get("zero_softcap"):  # circuit-tracer inside zero_softcap(): the cap-free ones
        targets = free
      else:  # the cap moves the probabilities: the comparison of defaults is a real one
        capped = _salient(m.cfg, m.params, toks, kw)
        assert not np.allclose(free.probabilities[:1], capped.probabilities[:1], rtol=1e-3)
    g = T.attribute_graph(m.cfg, m.params, tc, toks, targets=targets, **kw)
    assert g.n_features > 0 and np.abs(g.adjacency[:g.n_features]).max() > 0
    figures.append(_compare(g, ref, f"{case}/{i}"))
    if "graph_json" in opt:
      slug = f"{case}_{i}"
      path = T.write_graph_files(g, tmp_path, slug=slug, scan="test", prompt="",
                                 prompt_tokens=[f"t{t}" for t in g.input_tokens],
                                 logit_labels=[f"t{t}" for t in g.logit_tokens],
                                 node_threshold=opt["graph_json"][0],
                                 edge_threshold=opt["graph_json"][1])
      with open(path) as fh:
        mine = json.load(fh)
      with open(base / "ct" / f"{slug}.json") as fh:
        theirs = json.load(fh)
      assert mine["links"]
      sizes.append(_same_graph_json(mine, theirs, float(np.abs(g.adjacency).max())))
  print(case, "Pearson >=", min(p for p, _ in figures), "max |diff| / max |A| <=",
        max(r for _, r in figures), "graph.json (nodes, links, max |diff| / max |A|):", sizes)
