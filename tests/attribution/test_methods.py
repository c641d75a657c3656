"""Information flow routes, node- and neuron-level attribution, ensembles and bootstrap stability:
against the torch oracles written from the `eap` package's definitions, internal identities, the
known circuit of the bundled induction model, node/neuron circuits and their files, bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import bootstrap, ensemble
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.evaluation import levels
from jaxinterp.groundtruth import toy
from tests.attribution import test_attribute
from tests.attribution.test_attribute import CFG, DATA, PARAMS, _corr, _torch_inputs

# CPU-heavy (the torch oracles and the toy-model checks of IFR, node and neuron attribution):
# left out of the default run, run by CI (-m slow).
pytestmark = pytest.mark.slow
torch_setup = test_attribute.torch_setup  # the fixture, shared

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S = models.edges.n_senders(CFG)


# ------------------------------------------------------------ the torch oracles (eap's definitions)


@pytest.mark.parametrize("ifr_input", ["token", "token+position"])
def test_ifr_matches_torch_oracle(torch_setup, ifr_input):
  from tests.attribution import torch_oracle_nodes as N
  oracle, model, data = torch_setup
  clean, _, mask, *_ = _torch_inputs(data)
  ref = N.ifr_scores(oracle, clean, mask, token_input=ifr_input == "token")
  ours = A.attribute(model.cfg, model.params, data, method="information-flow-routes", batch_size=8,
                     quiet=True, options=A.ifr.IFROptions(ifr_input=ifr_input)).scores
  valid = valid_edges(model.cfg)
  r = _corr(ours[valid], ref[valid])
  err = np.abs(ours - ref).max()
  print(f"IFR ({ifr_input}): pearson={r:.7f} max abs err={err:.2e}")
  assert r >= 0.999 and err < 1e-4


@pytest.mark.parametrize("method", ["EAP", "EAP-IG-inputs", "exact"])
def test_node_and_neuron_scores_match_torch_oracle(torch_setup, method):
  """Neuron scores (EAP, EAP-IG-inputs) and node scores (their sums; exact node patching)."""
  from tests.attribution import torch_oracle_nodes as N
  oracle, model, data = torch_setup
  args = _torch_inputs(data)
  level = "node" if method == "exact" else "neuron"
  if method == "exact":
    ref = N.exact_node_scores(oracle, *args)
  else:
    ref = N.node_scores(oracle, *args, steps=5 if method == "EAP-IG-inputs" else None,
                        neuron=True)
  steps = {"ig_steps": 5} if method == "EAP-IG-inputs" else {}  # the option only it has
  ours = A.attribute(model.cfg, model.params, data, method=method, level=level, batch_size=8,
                     quiet=True, **steps).scores
  assert ours.shape == ref.shape
  for what, a, b in ((level, ours, ref), ("node", ours.reshape(len(ours), -1).sum(1),
                                          ref.reshape(len(ref), -1).sum(1))):
    r = _corr(a.ravel(), b.ravel())
    rel = np.abs(a - b).max() / np.abs(b).max()
    print(f"{method} {what}: pearson={r:.7f} max rel err={rel:.2e}")
    assert r >= 0.999 and rel <= 1e-2


def test_neuron_circuit_evaluation_matches_torch_oracle(torch_setup):
  from tests.attribution import torch_oracle_nodes as N
  oracle, model, data = torch_setup
  keep = np.random.RandomState(0).rand(models.edges.n_senders(model.cfg), model.cfg.d_model) < 0.6
  ref = N.neuron_circuit_metric(oracle, *_torch_inputs(data), keep)
  ours = levels.evaluate_neuron_circuits(model.cfg, model.params, data, keep, batch_size=8,
                                         quiet=True)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- internal checks


def test_node_scores_are_sums_of_edges_and_neurons():
  """NAP = the row sums of EAP's edge scores (a node's output reaches every receiver through the
  residual stream) and = the sum of its neuron scores (exact node patching is checked against the
  graph-form torch oracle, which ablates the node's outgoing edges)."""
  eap = A.attribute(CFG, PARAMS, DATA, method="EAP", batch_size=8, quiet=True).scores
  nap = A.attribute(CFG, PARAMS, DATA, method="EAP", level="node", batch_size=8, quiet=True).scores
  neu = A.attribute(CFG, PARAMS, DATA, method="EAP", level="neuron", batch_size=8, quiet=True)
  assert nap.shape == (S,) and neu.scores.shape == (S, CFG.d_model)
  np.testing.assert_allclose(nap, eap.sum(1), atol=1e-6)
  np.testing.assert_allclose(neu.scores.sum(1), nap, atol=1e-6)


def test_neuron_circuits_agree_with_edge_circuits():
  """Dropping all of a node's neurons = ablating every outgoing edge; all kept = the model."""
  g = Graph.from_config(CFG)
  keeps = np.ones((3, S, CFG.d_model), bool)
  keeps[1, 2] = False  # node 2 (a0.h1) ablated
  keeps[2] = False
  got = levels.evaluate_neuron_circuits(CFG, PARAMS, DATA, keeps, batch_size=8, quiet=True)
  w = g.full().edge_weights()
  w[2] = 0
  m_full, m_empty = V.baselines(CFG, PARAMS, DATA, batch_size=8)
  np.testing.assert_allclose(got, [m_full, V.evaluate_circuits(CFG, PARAMS, DATA, w, batch_size=8,
                                                               quiet=True), m_empty], atol=1e-5)


@pytest.mark.parametrize("method,level", [("EAP-IG-inputs", "neuron"),
                                          pytest.param("exact", "node", marks=pytest.mark.slow)])
def test_levels_keep_the_driver_contract(method, level):
  """Shape, finiteness, batch-size invariance and a bitwise resumed run at node/neuron level."""
  m = A.get_method(method)
  kw = dict(method=method, level=level, quiet=True, **m.options_among({"ig_steps": 2}))
  full = A.attribute(CFG, PARAMS, DATA, batch_size=3, **kw)
  assert full.scores.shape == m.valid_mask(CFG, A.Options(level=level)).shape
  assert np.all(np.isfinite(full.scores)) and np.abs(full.scores).max() > 1e-4
  one = A.attribute(CFG, PARAMS, DATA, batch_size=8, **kw)
  np.testing.assert_allclose(one.scores, full.scores, atol=1e-5 * max(1, abs(full.clean_metric)))
  states = []
  A.attribute(CFG, PARAMS, DATA, batch_size=3, on_batch=states.append, **kw)
  resumed = A.attribute(CFG, PARAMS, DATA, batch_size=3, resume=states[0], **kw)
  np.testing.assert_array_equal(resumed.scores, full.scores)


def test_ifr_shares_and_no_ablation():
  """IFR: each receiver's column is a distribution over its upstream senders (1 per receiver),
  the intervention is ignored, and it runs on data without corrupted prompts."""
  ifr = A.attribute(CFG, PARAMS, DATA, method="information-flow-routes", batch_size=3, quiet=True)
  valid = valid_edges(CFG)
  assert np.all(ifr.scores[valid] >= 0) and np.all(ifr.scores[~valid] == 0)
  np.testing.assert_allclose(ifr.scores.sum(0), 1.0, atol=1e-5)
  clean_only = dataclasses.replace(DATA, corrupted=DATA.clean, has_corrupted=False)
  zero = A.attribute(CFG, PARAMS, clean_only, method="information-flow-routes",
                     intervention="zero", batch_size=8, quiet=True)
  np.testing.assert_allclose(zero.scores, ifr.scores, atol=1e-6)


def test_methods_that_need_corrupted_prompts_say_so(tmp_path):
  clean_only = dataclasses.replace(DATA, has_corrupted=False, source="clean.csv")
  for method, kw in (("EAP", {}), ("EAP-IG-inputs", {}),
                     ("clean-corrupted", {"intervention": "zero"}),
                     ("EAP+information-flow-routes", {})):
    with pytest.raises(A.AttributionError, match="needs corrupted prompts.*clean.csv"):
      A.attribute(CFG, PARAMS, clean_only, method=method, quiet=True, **kw)
  A.attribute(CFG, PARAMS, clean_only, method="EAP", intervention="mean", quiet=True)
  with pytest.raises(A.AttributionError, match="patching.*has none"):
    V.baselines(CFG, PARAMS, clean_only)
  # A CSV without a `corrupted` column loads as such data.
  from tokenizers import Tokenizer, pre_tokenizers
  from tokenizers import models as tm

  from tests.tasks.test_tasks import WORDS, W, write
  tok = Tokenizer(tm.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  p = write(tmp_path, ["clean", "correct_idx", "incorrect_idx"],
            [["the cat sat", W("is"), W("are")]])
  ds = tasks.load_task("ioi", p, tok, bos_id=1)
  assert not ds.has_corrupted and np.array_equal(ds.clean, ds.corrupted)


def test_bad_levels_and_bootstrap_counts_are_refused():
  with pytest.raises(A.AttributionError, match="EAP-IG-activations scores edges only; "
                                               "level='node' works with .*'exact'"):
    A.attribute(CFG, PARAMS, DATA, method="EAP-IG-activations", level="node", quiet=True)
  with pytest.raises(A.AttributionError, match="scores edges only"):  # prebuilt options too
    A.attribute(CFG, PARAMS, DATA, "EAP-IG-activations", A.IGOptions(level="node"), quiet=True)
  with pytest.raises(A.AttributionError, match="ensemble member information-flow-routes has no "
                                               "node level"):
    A.attribute(CFG, PARAMS, DATA, method="EAP+information-flow-routes", level="node", quiet=True)
  with pytest.raises(A.AttributionError, match="no neuron level"):
    A.attribute(CFG, PARAMS, DATA, method="exact", level="neuron", quiet=True)
  with pytest.raises(A.AttributionError, match="level must be one of"):
    A.attribute(CFG, PARAMS, DATA, method="EAP", level="head", quiet=True)
  for b in (0, -3, 1, True):
    with pytest.raises(A.AttributionError, match="bootstrap must be an integer >= 2"):
      A.attribute(CFG, PARAMS, DATA, method="EAP", bootstrap=b, quiet=True)
  with pytest.raises(A.AttributionError, match=r"unknown method\(s\) \['EAP-X'\]"):
    A.get_method("EAP+EAP-X")
  with pytest.raises(A.AttributionError, match="must differ"):
    A.get_method("EAP+EAP")


def test_rank_normalisation_and_ensembles():
  valid = np.array([True, True, True, True, False])
  np.testing.assert_allclose(ensemble.rank_normalise(np.array([-3.0, 1.0, 1.0, 0.0, 9.0]), valid),
                             [-1.0, 0.625, 0.625, 0.0, 0.0])
  m = A.get_method("EAP+EAP-IG-inputs")
  assert m.name == "EAP+EAP-IG-inputs" and m.interventions == ("patching",) and m.needs_corrupted
  ens = A.attribute(CFG, PARAMS, DATA, method=m.name, ig_steps=2, batch_size=8, quiet=True)
  eap = A.attribute(CFG, PARAMS, DATA, method="EAP", batch_size=8, quiet=True).scores
  ig = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-inputs", ig_steps=2, batch_size=8,
                   quiet=True).scores
  valid = valid_edges(CFG)
  want = (ensemble.rank_normalise(-eap, valid) + ensemble.rank_normalise(-ig, valid)) / 2
  np.testing.assert_allclose(ens.scores, want, atol=1e-6)
  mixed = A.attribute(CFG, PARAMS, DATA, method="EAP+information-flow-routes", batch_size=8,
                     quiet=True, bootstrap=5)
  assert np.abs(mixed.scores).max() <= 1 and mixed.extras["bootstrap_std"].shape == valid.shape


def test_bootstrap_std_and_sign_stability():
  """With one example per batch the bootstrap std of a mean is the standard error; the sign
  fraction is 1 for edges whose per-example scores all share a sign. A resumed run is bitwise."""
  kw = dict(method="EAP", batch_size=1, quiet=True, bootstrap=400, seed=3)
  states = []
  res = A.attribute(CFG, PARAMS, DATA, on_batch=states.append, **kw)
  per_example = np.stack(states[-1].batch_sums)  # batches of one example
  assert per_example.shape == (len(DATA),) + res.scores.shape
  np.testing.assert_allclose(per_example.mean(0), res.scores, atol=1e-6)
  valid = valid_edges(CFG)
  se = per_example.std(0) / np.sqrt(len(DATA))
  big = valid & (se > 1e-4)
  ratio = res.extras["bootstrap_std"][big] / se[big]
  assert 0.8 < np.median(ratio) < 1.1
  frac = res.extras["bootstrap_sign_fraction"]
  strong, weak = valid & (np.abs(res.scores) > 3 * se), valid & (np.abs(res.scores) < 0.3 * se)
  assert strong.any() and weak.any()
  assert np.median(frac[strong]) >= 0.98 and np.median(frac[weak]) <= 0.8
  resumed = A.attribute(CFG, PARAMS, DATA, resume=states[3], **kw)
  for k in ("bootstrap_std", "bootstrap_sign_fraction"):
    np.testing.assert_array_equal(resumed.extras[k], res.extras[k])
  s = bootstrap.summary(res.scores, res.extras["bootstrap_std"], frac, valid, strong)
  assert s["all"]["count"] == valid.sum() and s["selected"]["count"] == strong.sum()


def test_node_and_neuron_circuits_and_their_json(tmp_path):
  """Top-n at node/neuron level as eap's apply_topn (then pruned), written in eap's JSON format
  (node scores; `neurons` and `neurons_scores`, in the loss sign) and read back."""
  nap = A.attribute(CFG, PARAMS, DATA, method="EAP", level="node", batch_size=8, quiet=True).scores
  c = levels.top_n(CFG, nap, 4, "node")
  kept = np.argsort(-np.abs(nap), kind="stable")[:4]
  assert set(np.flatnonzero(c.nodes_in_graph)) <= set(kept)
  assert np.all(c.in_graph <= (c.nodes_in_graph[:, None] & c.valid))
  neu = A.attribute(CFG, PARAMS, DATA, method="EAP", level="neuron", batch_size=8,
                    quiet=True).scores
  c = levels.top_n(CFG, neu, 40, "neuron")
  assert c.neurons_in_graph.sum() <= 40 and not c.neurons_in_graph[~c.nodes_in_graph].any()
  c.to_json(tmp_path / "g.json")
  doc = json.loads((tmp_path / "g.json").read_text())
  node = doc["nodes"]["a0.h1"]
  assert len(node["neurons"]) == CFG.d_model
  np.testing.assert_allclose(node["neurons_scores"], -neu[2], rtol=1e-6)  # files: loss sign
  back = Graph.from_json(tmp_path / "g.json", CFG)
  np.testing.assert_array_equal(back.neurons_in_graph, c.neurons_in_graph)
  c.to_npz(tmp_path / "g.npz")
  np.testing.assert_array_equal(Graph.from_npz(tmp_path / "g.npz", CFG).neuron_scores, neu)
  curve = levels.faithfulness_curve(CFG, PARAMS, DATA, neu, "neuron", counts=[0, 40, S * 32],
                                    batch_size=8, quiet=True)
  np.testing.assert_allclose(curve.faithfulness[[0, -1]], [0.0, 1.0], atol=1e-4)
  assert curve.rows()[1]["n_neurons"] == 40


# ----------------------------------------------------------------- the bundled induction model


@pytest.fixture(scope="module")
def induction():
  return toy.load_toy(), toy.induction_task_dataset(64)  # find_circuit's default


def test_node_level_finds_the_induction_circuit(induction):
  """a0.h3 (previous-token head) and a1.h0 (induction head) are among the top-3 nodes of NAP-IG
  and exact node patching (with the input embedding)."""
  m, data = induction
  names = Graph.from_config(m.cfg).sender_names
  for method in ("EAP-IG-inputs", "exact"):
    s = A.attribute(m.cfg, m.params, data, method=method, level="node", batch_size=32,
                    quiet=True).scores
    top = {names[i] for i in np.argsort(-np.abs(s))[:3]}
    assert {"a0.h3", "a1.h0"} <= top, (method, top)


def test_ensemble_and_ifr_find_the_induction_circuit(induction):
  m, data = induction
  ens = A.attribute(m.cfg, m.params, data, method="EAP+EAP-IG-inputs", batch_size=32, quiet=True)
  top = [n for n, _ in Graph.from_config(m.cfg, ens.scores, "loss").ranked_edges(5)]
  assert {"a0.h3->a1.h0<k>", "a1.h0->logits"} <= set(top), top
  # IFR is a share of each receiver's input (edges from the input into layer 0 are 1 by
  # construction): a0.h3 is the largest share of a1.h0's key input, a1.h0 of the logits'.
  ifr = A.attribute(m.cfg, m.params, data, method="information-flow-routes", batch_size=32,
                    quiet=True).scores
  g = Graph.from_config(m.cfg)
  for receiver, sender in (("a1.h0<k>", "a0.h3"), ("logits", "a1.h0")):
    col = ifr[:, g.layout.receiver_names.index(receiver)]
    assert g.sender_names[int(np.argmax(col))] == sender


# ------------------------------------------------------------------------------- find_circuit


def _find_circuit(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxinterp.experiments.find_circuit", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_find_circuit_refuses_bad_bootstrap_and_method(tmp_path):
  r = _find_circuit("--bootstrap=0", f"--out={tmp_path / 'a'}")
  assert r.returncode != 0 and "--bootstrap=0" in r.stderr
  r = _find_circuit("--method=EAP+nope", f"--out={tmp_path / 'b'}")
  assert r.returncode != 0 and "--method=EAP+nope" in r.stderr and "nope" in r.stderr


@pytest.mark.slow
def test_find_circuit_node_level_with_bootstrap(tmp_path):
  out = tmp_path / "run"
  r = _find_circuit("--level=node", "--method=exact", "--n_examples=16", "--batch_size=4",
                    "--top_n=4", "--bootstrap=10", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "top nodes" in r.stdout
  doc = json.loads((out / "graph.json").read_text())
  assert doc["meta"]["level"] == "node" and doc["meta"]["bootstrap"]["resamples"] == 10
  assert all("score" in v for k, v in doc["nodes"].items() if k != "logits")
  z = np.load(out / "scores.npz")
  assert z["scores"].shape == z["bootstrap_std"].shape == z["node_scores"].shape
