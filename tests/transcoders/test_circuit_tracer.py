"""Equality with circuit-tracer's own functions (run in its own virtual environment as a
subprocess): pruning, graph scores, partial influences, graph.json, logit targets, and transcoders
written by either side and read by the other.

The interpreter is $JAXINTERP_CIRCUIT_TRACER_PYTHON, by default ../ct-venv/bin/python next to the
repository (tests/transcoders/ct_venv.py); the tests skip when it (or circuit-tracer in it) is
absent.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxinterp import transcoders as T
from tests.transcoders import ct_venv
from tests.transcoders.graphs import random_graph

DRIVER = pathlib.Path(__file__).with_name("circuit_tracer_driver.py")
L, POS, D, F, VOCAB = 2, 5, 8, 16, 50
GRAPHS = {  # name: (random_graph arguments, (node_threshold, edge_threshold))
    "g0": (dict(seed=0), (0.8, 0.98)),
    "g1": (dict(seed=1, n_layers=3, n_pos=5, n_active=30, n_features=20, n_logits=5), (0.5, 0.9)),
    "g2": (dict(seed=2, n_pos=3, n_active=6, n_logits=1), (1.0, 1.0)),
    "g3": (dict(seed=3, n_layers=4, n_pos=6, n_active=60, n_logits=10, density=0.3), (0.8, 0.98)),
}
TARGET_SETTINGS = [(10, 0.95), (3, 0.95), (10, 0.5), (10, 1.0)]


pytestmark = pytest.mark.skipif(not ct_venv.have_circuit_tracer(),
                                reason=f"circuit-tracer is not installed at {ct_venv.PYTHON}")


def _plt(rng, jump: bool, skip: bool) -> T.PerLayerTranscoders:
  a = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)  # noqa: E731
  return T.PerLayerTranscoders(
      a(L, D, F), a(L, F), a(L, F, D), a(L, D),
      threshold=jnp.asarray(rng.uniform(0, 0.5, (L, F)), jnp.float32) if jump else None,
      W_skip=a(L, D, D) if skip else None, input_hook="mlp.hook_in", output_hook="hook_mlp_out")


def _clt(rng, jump: bool) -> T.CrossLayerTranscoder:
  a = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)  # noqa: E731
  return T.CrossLayerTranscoder(
      a(L, D, F), a(L, F), tuple(a(F, L - s, D) for s in range(L)), a(L, D),
      threshold=jnp.asarray(rng.uniform(0, 0.5, (L, F)), jnp.float32) if jump else None)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
  """Write every input, run the driver once, return (dir, ours, circuit-tracer's outputs)."""
  base = tmp_path_factory.mktemp("ct")
  rng = np.random.default_rng(0)
  inputs = {"vocab_size": VOCAB, "F": F, "graph_names": json.dumps(list(GRAPHS)),
            "x": rng.normal(size=(L, POS, D)).astype(np.float32)}
  ours = {"graphs": {}, "plt": {}, "clt": {}}
  for name, (kw, thresholds) in GRAPHS.items():
    g = random_graph(vocab_size=VOCAB, **kw)
    ours["graphs"][name] = g
    for k in T.graph.NPZ_ARRAYS:
      inputs[f"{name}/{k}"] = getattr(g, k)
    rows = np.concatenate([np.arange(g.logit_start, g.n_nodes), np.arange(min(4, g.n_features))])
    inputs.update({f"{name}/n_layers": g.n_layers, f"{name}/vocab_size": VOCAB,
                   f"{name}/prompt": "t1 t2", f"{name}/thresholds": np.array(thresholds),
                   f"{name}/partial_rows": rows})
  inputs["n_target_cases"] = len(TARGET_SETTINGS)
  for i, s in enumerate(TARGET_SETTINGS):
    inputs[f"targets{i}/logits"] = (rng.normal(size=VOCAB) * 3).astype(np.float32)
    inputs[f"targets{i}/unembed"] = rng.normal(size=(D, VOCAB)).astype(np.float32)
    inputs[f"targets{i}/settings"] = np.array(s, np.float64)
  for name, jump, skip in (("plt_relu", False, False), ("plt_jump_skip", True, True)):
    ours["plt"][name] = _plt(rng, jump, skip)
    T.save_transcoder_set(ours["plt"][name], base / name)
  for name, jump in (("clt_relu", False), ("clt_jump", True)):
    ours["clt"][name] = _clt(rng, jump)
    T.save_clt(ours["clt"][name], base / name)
  gs = _plt(rng, True, False)
  os.makedirs(base / "gemma_scope")
  for i in range(L):
    np.savez(base / "gemma_scope" / f"layer_{i}.npz", W_enc=np.asarray(gs.W_enc[i]),
             W_dec=np.asarray(gs.W_dec[i]), b_enc=np.asarray(gs.b_enc[i]),
             b_dec=np.asarray(gs.b_dec[i]), threshold=np.asarray(gs.threshold[i]))
  ours["gemma_scope"] = T.load_gemma_scope(
      [str(base / "gemma_scope" / f"layer_{i}.npz") for i in range(L)])
  inputs["plt_names"] = json.dumps(list(ours["plt"]))
  inputs["clt_names"] = json.dumps(list(ours["clt"]))
  np.savez(base / "inputs.npz", **inputs)
  ref = ct_venv.run_driver(DRIVER, base, "outputs.npz", timeout=600)
  return base, ours, ref, inputs


@pytest.mark.parametrize("name", list(GRAPHS))
def test_prune_and_scores_equal_circuit_tracer(ct, name):
  _, ours, ref, _ = ct
  g = ours["graphs"][name]
  res = T.prune(g, *GRAPHS[name][1])
  np.testing.assert_array_equal(res.node_mask, ref[f"{name}/node_mask"])
  np.testing.assert_array_equal(res.edge_mask, ref[f"{name}/edge_mask"])
  assert res.edge_mask.any() and not res.node_mask.all() or name == "g2"
  np.testing.assert_allclose(res.cumulative_scores, ref[f"{name}/cumulative_scores"], atol=1e-6)
  np.testing.assert_allclose(T.graph_scores(g), ref[f"{name}/scores"], atol=1e-6)
  rows = np.concatenate([np.arange(g.logit_start, g.n_nodes), np.arange(min(4, g.n_features))])
  partial = T.pruning.partial_influences(g.adjacency[rows], g.logit_probabilities, rows)
  np.testing.assert_allclose(partial, ref[f"{name}/partial"], rtol=1e-5, atol=1e-7)


def _same_json(ours, theirs, path="$"):
  if isinstance(theirs, float) or isinstance(ours, float):
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7), path
  elif isinstance(theirs, dict):
    assert list(ours) == list(theirs), path
    for k in theirs:
      _same_json(ours[k], theirs[k], f"{path}.{k}")
  elif isinstance(theirs, list):
    assert len(ours) == len(theirs), path
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
      _same_json(a, b, f"{path}[{i}]")
  else:
    assert ours == theirs, path


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_json_equals_create_graph_files(ct, name, tmp_path):
  base, ours, _, inputs = ct
  g = ours["graphs"][name]
  nt, et = GRAPHS[name][1]
  path = T.write_graph_files(g, tmp_path, slug=name, scan="test-scan", prompt="t1 t2",
                             prompt_tokens=[f"t{t}" for t in g.input_tokens],
                             logit_labels=[f"t{t}" for t in g.logit_tokens], node_threshold=nt,
                             edge_threshold=et)
  with open(path) as fh:
    mine = json.load(fh)
  with open(base / "ct" / f"{name}.json") as fh:
    theirs = json.load(fh)
  assert mine["links"] and len(mine["nodes"]) > g.n_pos + g.n_logits
  _same_json(mine, theirs)
  with open(tmp_path / "graph-metadata.json") as fh:
    index = json.load(fh)
  assert index["graphs"] == [theirs["metadata"]]


@pytest.mark.parametrize("case", range(len(TARGET_SETTINGS)))
def test_salient_logits_equal_circuit_tracer(ct, case):
  _, _, ref, inputs = ct
  n, p = TARGET_SETTINGS[case]
  t = T.salient_logits(inputs[f"targets{case}/logits"], inputs[f"targets{case}/unembed"],
                       max_n_logits=n, desired_logit_prob=p)
  np.testing.assert_array_equal(t.token_ids, ref[f"targets{case}/ids"])
  np.testing.assert_allclose(t.probabilities, ref[f"targets{case}/probs"], rtol=1e-6)
  np.testing.assert_allclose(t.vectors, ref[f"targets{case}/vecs"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["plt_relu", "plt_jump_skip"])
def test_our_transcoder_sets_load_in_circuit_tracer(ct, name):
  _, ours, ref, inputs = ct
  tc, x = ours["plt"][name], inputs["x"]
  for key in (name, name + "_via_config"):
    np.testing.assert_allclose(tc.encode(x), ref[key + "/encode"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tc.reconstruct(x), ref[key + "/forward"], rtol=1e-5, atol=1e-5)
  assert (np.asarray(tc.encode(x)) > 0).any()


@pytest.mark.parametrize("name", ["clt_relu", "clt_jump"])
def test_our_clts_load_in_circuit_tracer(ct, name):
  _, ours, ref, inputs = ct
  clt, x = ours["clt"][name], inputs["x"]
  np.testing.assert_allclose(clt.encode(x), ref[name + "/encode"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(clt.reconstruct(x), ref[name + "/decode"], rtol=1e-5, atol=1e-5)


def _config(directory, **conf):
  with open(directory / "config.yaml", "w") as fh:
    yaml.safe_dump(conf, fh)
  return directory / "config.yaml"


def test_we_load_circuit_tracers_files(ct):
  base, ours, ref, inputs = ct
  x = inputs["x"]
  conf = _config(base / "ct" / "ct_plt", model_kind="transcoder_set",
                 feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                 transcoders=[f"layer_{i}.safetensors" for i in range(L)])
  tc = T.load(conf)
  assert tc.activation == "jumprelu" and tc.W_skip is not None
  np.testing.assert_allclose(tc.encode(x), ref["ct_plt/encode"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tc.reconstruct(x), ref["ct_plt/forward"], rtol=1e-5, atol=1e-5)
  for act in ("relu", "jump_relu"):
    d = base / "ct" / f"ct_clt_{act}"
    clt = T.load(_config(d, model_kind="cross_layer_transcoder",
                         feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out"))
    assert clt.activation == ("relu" if act == "relu" else "jumprelu")
    np.testing.assert_allclose(clt.encode(x), ref[f"ct_clt_{act}/encode"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(clt.reconstruct(x), ref[f"ct_clt_{act}/decode"], rtol=1e-5,
                               atol=1e-5)
  gs = ours["gemma_scope"]
  np.testing.assert_allclose(gs.encode(x), ref["gemma_scope/encode"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gs.reconstruct(x), ref["gemma_scope/forward"], rtol=1e-5, atol=1e-5)
