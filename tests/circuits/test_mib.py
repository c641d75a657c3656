"""MIB and EAP-IG interoperability: signed selection means the same in our files as in EAP-IG's
`apply_topn(absolute=False)`; MIB's evaluation protocol (`evaluate_area_under_curve`) on a hand-made
curve and on a model, checked against independent reimplementations; leaderboard submissions; MIB's
task loaders on fixtures written in MIB's format (`tests/fixtures/mib`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import circuits as C
from jaxinterp import models, tasks
from jaxinterp.circuits import Graph, convention
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.evaluation import report
from jaxinterp.groundtruth import toy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mib"
TOKENIZER = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "gpt2-tokenizer"
# A checkout of github.com/hannamw/MIB-circuit-track (not on PyPI): its published GPT-2 small IOI
# circuit, circuits/ioi-eap-ig.json, written by the `eap` package.
MIB_REPO = Path(os.environ.get("JAXINTERP_MIB_REPO",
                               Path(__file__).resolve().parents[2].parent / "MIB-circuit-track"))
FRACTIONS = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)


# ---------------------------------------------------------------------------------------------
# An independent reimplementation of EAP-IG's graph indexing, `apply_topn` and `prune`, read from
# a graph JSON as EAP-IG's `Graph.from_json` reads it.


class EapGraph:
  """Dense EAP-IG matrices of a graph JSON: forward (sender) x backward (receiver) indices."""

  def __init__(self, d: dict):
    L, H = d["cfg"]["n_layers"], d["cfg"]["n_heads"]
    self.L, self.H = L, H
    self.n_fwd, self.n_bwd = 1 + L * (H + 1), L * (3 * H + 1) + 1
    self.scores = np.full((self.n_fwd, self.n_bwd), -np.inf)
    self.real = np.zeros((self.n_fwd, self.n_bwd), bool)
    self.names = {}
    for name, info in d["edges"].items():
      f, b = self.index(name)
      self.scores[f, b] = info.get("score", 0.0)
      self.real[f, b] = True
      self.names[f, b] = name
    self.node_scores = np.full(self.n_fwd, np.nan)
    for name, info in d["nodes"].items():
      if name != "logits" and isinstance(info, dict) and "score" in info:
        self.node_scores[self.fwd(name)] = info["score"]
    # forward_to_backward: which receivers belong to each forward node
    self.f2b = np.zeros((self.n_fwd, self.n_bwd), bool)
    for li in range(L):
      for h in range(H):
        for j in range(3):
          self.f2b[1 + li * (H + 1) + h, li * (3 * H + 1) + j * H + h] = True
      self.f2b[1 + li * (H + 1) + H, li * (3 * H + 1) + 3 * H] = True

  def fwd(self, node: str) -> int:
    if node == "input":
      return 0
    m = re.fullmatch(r"a(\d+)\.h(\d+)", node)
    if m:
      return 1 + int(m[1]) * (self.H + 1) + int(m[2])
    return 1 + int(node[1:]) * (self.H + 1) + self.H

  def index(self, edge: str) -> tuple[int, int]:
    parent, child = edge.split("->")
    if child == "logits":
      return self.fwd(parent), self.n_bwd - 1
    m = re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", child)
    if m:
      return self.fwd(parent), int(m[1]) * (3 * self.H + 1) + "qkv".index(m[3]) * self.H + int(m[2])
    return self.fwd(parent), int(child[1:]) * (3 * self.H + 1) + 3 * self.H

  def prune(self, in_graph: np.ndarray, nodes: np.ndarray):
    while True:
      out = in_graph.any(1)
      inc = (in_graph.any(0)[None, :] & self.f2b).any(1)
      inc[0] = True
      new_nodes = out & inc
      backward = (new_nodes[:, None] & self.f2b).any(0)
      backward[-1] = True
      new = in_graph & new_nodes[:, None] & backward[None, :]
      if np.array_equal(new, in_graph) and np.array_equal(new_nodes, nodes):
        return new, new_nodes
      in_graph, nodes = new, new_nodes

  def apply_topn(self, n: int, absolute: bool, level: str = "edge"):
    """(in_graph, nodes) after `apply_topn(n, absolute, level, reset=True, prune=True)`."""
    in_graph = np.zeros((self.n_fwd, self.n_bwd), bool)
    if level == "node":
      scored = ~np.isnan(self.node_scores)
      key = np.abs(self.node_scores) if absolute else self.node_scores.copy()
      key[~scored] = -np.inf
      nodes = np.zeros(self.n_fwd, bool)
      nodes[np.argsort(-key, kind="stable")[:n]] = True
      nodes[~scored] = True
      in_graph |= nodes[:, None]
    else:
      key = np.abs(self.scores) if absolute else self.scores.copy()
      key[~self.real] = -np.inf
      flat = np.argsort(-key.ravel(), kind="stable")[:n]
      in_graph.ravel()[flat] = True
      nodes = in_graph.any(1) & (in_graph.any(0)[None, :] & self.f2b).any(1)
      nodes[0] = True
    return self.prune(in_graph, nodes)

  def edge_names(self, in_graph: np.ndarray) -> set:
    return {self.names[f, b] for f, b in zip(*np.nonzero(in_graph & self.real), strict=True)}


def our_edge_names(g: Graph) -> set:
  return {name for name, info in g.to_dict()["edges"].items() if info["in_graph"]}


@pytest.fixture(scope="module")
def toy_scores():
  m = toy.load_toy()
  data = toy.induction_task_dataset(16)
  res = A.attribute(m.cfg, m.params, data, method="EAP", batch_size=16, quiet=True)
  return m, data, res.scores


def test_signed_selection_is_eap_ig_s_apply_topn_on_our_graph_json(toy_scores, tmp_path):
  m, data, scores = toy_scores
  g = Graph.from_config(m.cfg, scores, score_convention=convention.for_task(data.task))
  assert g.score_convention == "metric"
  path = tmp_path / "graph.json"
  g.to_json(path, meta={"method": "EAP"})
  d = json.loads(path.read_text())
  assert d["meta"]["score_convention"] == "loss"
  eap = EapGraph(d)
  back = Graph.from_json(path, m.cfg)
  for n in (1, 5, 20, 60):
    ours = g.top_n(n, absolute=False)
    in_graph, _ = eap.apply_topn(n, absolute=False)
    assert our_edge_names(ours) == eap.edge_names(in_graph), n
    assert our_edge_names(back.top_n(n, absolute=False)) == eap.edge_names(in_graph), n
    in_abs, _ = eap.apply_topn(n, absolute=True)
    assert our_edge_names(g.top_n(n)) == eap.edge_names(in_abs), n
  # Signed = most important: the edges whose ablation lowers the metric most (negative scores).
  top = g.top_n(10, absolute=False, prune=False)
  assert scores[top.in_graph].max() < 0
  assert np.sort(scores[g.valid])[9] == scores[top.in_graph].max()


def test_old_files_and_eap_ig_files_keep_their_meaning(toy_scores, tmp_path):
  m, _, scores = toy_scores
  g = Graph.from_config(m.cfg, scores, score_convention="metric")
  want = our_edge_names(g.top_n(15, absolute=False))
  # A jaxinterp file written before the key existed held our sign: read as the metric convention.
  d = Graph.from_config(m.cfg, scores).to_dict()  # scores as they are in memory
  d["meta"] = {"jaxinterp_version": "0.1.0", "metric": "task"}
  (tmp_path / "old.json").write_text(json.dumps(d))
  old = Graph.from_json(tmp_path / "old.json", m.cfg)
  assert old.score_convention == "metric" and our_edge_names(old.top_n(15, absolute=False)) == want
  # EAP-IG's own file (no meta) holds -scores: the same circuit.
  d = Graph.from_config(m.cfg, -scores).to_dict()
  assert "meta" not in d
  (tmp_path / "eap.json").write_text(json.dumps(d))
  eap = Graph.from_json(tmp_path / "eap.json", m.cfg)
  assert eap.score_convention == "loss" and our_edge_names(eap.top_n(15, absolute=False)) == want
  # The npz keeps the in-memory scores and their convention.
  g.to_npz(tmp_path / "g.npz")
  h = Graph.from_npz(tmp_path / "g.npz", m.cfg)
  assert np.array_equal(h.scores, g.scores) and h.score_convention == "metric"
  with pytest.raises(ValueError, match="unknown score convention"):
    Graph.from_config(m.cfg, scores, score_convention="signed")


# ---------------------------------------------------------------------------------------------
# MIB's protocol


def mib_loop(fractions, faithfulnesses, log_scale):
  """`evaluate_area_under_curve`'s areas, transcribed independently."""
  area_under = area_from_1 = 0.0
  for i in range(len(faithfulnesses) - 1):
    x1, x2 = fractions[i], fractions[i + 1]
    if log_scale:
      x1, x2 = math.log(x1), math.log(x2)
    area_from_1 += (x2 - x1) * ((abs(1 - faithfulnesses[i]) + abs(1 - faithfulnesses[i + 1])) / 2)
    area_under += (x2 - x1) * ((faithfulnesses[i] + faithfulnesses[i + 1]) / 2)
  return area_under, area_from_1, sum(faithfulnesses) / len(faithfulnesses)


def test_cpr_cmd_on_a_hand_made_curve():
  f = [0.05, -0.2, 0.3, 0.55, 0.8, 1.3, 1.1, 0.95, 1.0, 1.0]
  for log_scale in (False, True):
    want = mib_loop(FRACTIONS, f, log_scale)
    s = C.mib_summary(f, list(range(10)), log_scale=log_scale)
    assert (s["area_under"], s["area_from_1"], s["average"]) == want
    assert C.area_under(FRACTIONS, f, log_scale) == want[0]
    assert C.area_from_1(FRACTIONS, f, log_scale) == want[1]
    pct = [100 * x for x in FRACTIONS]  # cpr / cmd take percentages
    assert C.cpr(pct, f, log_scale) == pytest.approx(want[0], rel=1e-12)
    assert C.cmd(pct, f, log_scale) == pytest.approx(want[1], rel=1e-12)
  assert mib_loop(FRACTIONS, [1.0] * 10, False)[0] == pytest.approx(0.999)
  with pytest.raises(C.GraphError):
    C.area_under(FRACTIONS, f[:3])
  with pytest.raises(C.GraphError):
    C.area_under([0.0, 1.0], [1.0, 1.0], log_scale=True)


@pytest.fixture(scope="module")
def oracle_setup(hf_gpt2_dir):
  pytest.importorskip("torch")
  from tests.attribution.torch_oracle import GPT2GraphOracle, random_task_batch
  path, hf = hf_gpt2_dir
  model = models.from_pretrained(path)
  b = random_task_batch(97, n=10, pos=9, seed=3)
  ds = tasks.Dataset(task=tasks.get_task("logit-diff"), clean=b.clean.numpy().astype(np.int32),
                     corrupted=b.corrupted.numpy().astype(np.int32),
                     lengths=(b.last + 1).numpy().astype(np.int32),
                     labels={"correct": b.correct.numpy().astype(np.int32),
                             "incorrect": b.incorrect.numpy().astype(np.int32)})
  return model, ds, GPT2GraphOracle(hf), b


@pytest.mark.parametrize("level", [pytest.param("edge", marks=pytest.mark.slow), "node"])
def test_mib_protocol_matches_mib_on_a_model(oracle_setup, level, tmp_path):
  import torch
  model, ds, oracle, b = oracle_setup
  rng = np.random.default_rng(0)
  g = Graph.from_config(model.cfg, rng.normal(size=Graph.from_config(model.cfg).valid.shape),
                        score_convention="metric")
  nodes = rng.normal(size=g.n_senders).astype(np.float32)
  nodes[[2, 5]] = np.nan  # unscored: always kept
  g = g.replace(node_attribution=nodes)
  ours = V.mib_protocol(model.cfg, model.params, ds, g, level=level, absolute=False, batch_size=4)

  # MIB on the graph JSON, with the torch oracle as the model.
  path = tmp_path / "importances.json"
  g.to_json(path)
  eap = EapGraph(json.loads(path.read_text()))
  ablated = oracle.senders(b.corrupted, b.mask)

  def metric(weights=None):
    w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    return float(oracle.metric(b.clean, b.mask, b.last, b.correct, b.incorrect, w,
                               None if w is None else ablated).mean())

  baseline, corrupted = metric(), metric(np.zeros((eap.n_fwd, eap.n_bwd)))
  n_items = eap.real.sum() if level == "edge" else (~np.isnan(eap.node_scores)).sum()
  faith, counts = [], []
  for frac in FRACTIONS:
    in_graph, _ = eap.apply_topn(int(frac * n_items), absolute=False, level=level)
    counts.append(float(in_graph.sum()))
    faith.append((metric(in_graph & eap.real) - corrupted) / (baseline - corrupted))
  area_under, area_from_1, average = mib_loop(FRACTIONS, faith, False)
  assert ours["weighted_edge_counts"] == counts
  np.testing.assert_allclose(ours["faithfulnesses"], faith, atol=1e-4)
  assert ours["area_under"] == pytest.approx(area_under, abs=1e-4)
  assert ours["area_from_1"] == pytest.approx(area_from_1, abs=1e-4)
  assert ours["average"] == pytest.approx(average, abs=1e-4)
  assert ours["faithfulnesses"][-1] == pytest.approx(1.0, abs=1e-5) or level == "node"


def test_mib_circuits_need_node_scores_for_the_node_level(toy_scores):
  m, _, scores = toy_scores
  with pytest.raises(C.GraphError, match="node scores"):
    C.mib_circuits(Graph.from_config(m.cfg, scores), level="node")
  with pytest.raises(C.GraphError, match="level"):
    C.mib_circuits(Graph.from_config(m.cfg, scores), level="neuron")


# ---------------------------------------------------------------------------------------------
# Submissions


def test_write_submission_both_kinds(toy_scores, tmp_path):
  m, data, scores = toy_scores
  g = Graph.from_config(m.cfg, scores, score_convention="metric")
  folder = C.write_submission(g, tmp_path, "arithmetic_addition", "toy")
  assert folder == str(tmp_path / "arithmetic-addition_toy")
  assert os.listdir(folder) == ["importances.json"]
  d = json.loads(Path(folder, "importances.json").read_text())
  assert set(d) == {"cfg", "nodes", "edges"} and len(d["edges"]) == g.n_edges  # MIB's format
  assert d["edges"]["input->logits"]["score"] == pytest.approx(-float(scores[0, -1]))
  C.write_submission(g, tmp_path, "arithmetic-addition", "toy", kind="circuits", absolute=False)
  files = sorted(os.listdir(folder), key=lambda f: float(f[8:-5]))
  assert files == [f"circuit_{p:g}.json" for p in C.SUBMISSION_PERCENTAGES]  # importances gone
  eap = EapGraph(d)
  for p, f in zip(C.SUBMISSION_PERCENTAGES, files, strict=True):
    c = json.loads(Path(folder, f).read_text())
    assert all(set(v) == {"in_graph"} for v in c["edges"].values())
    kept = {k for k, v in c["edges"].items() if v["in_graph"]}
    n = math.floor(p / 100 * g.n_edges)
    assert len(kept) <= n
    assert kept == eap.edge_names(eap.apply_topn(n, absolute=False)[0])
    h = Graph.from_json(Path(folder, f), m.cfg)  # binary circuits read back, scores 0
    assert our_edge_names(h) == kept and not h.scores.any()
  with pytest.raises(C.GraphError, match="kind"):
    C.write_submission(g, tmp_path, "ioi", "toy", kind="pt")


# ---------------------------------------------------------------------------------------------
# MIB's task loaders


@pytest.fixture(scope="module")
def gpt2_tok():
  if not TOKENIZER.exists():
    pytest.skip("../shared/models/gpt2-tokenizer is absent")
  from tokenizers import Tokenizer
  return Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))


def rows_of(path):
  return [json.loads(line) for line in open(path) if line.strip()]


def first_id(tok, text):
  return tok.encode(text, add_special_tokens=False).ids[0]


def test_mib_ioi(gpt2_tok):
  ds = tasks.load_mib_task("ioi", FIXTURES / "ioi.jsonl", gpt2_tok)
  rows = [r for r in rows_of(FIXTURES / "ioi.jsonl") if r["metadata"]["subject"] != "Guinevere"]
  assert len(ds) == 3 and ds.task.name == "ioi"
  np.testing.assert_array_equal(ds.labels["correct"],
                                [first_id(gpt2_tok, " " + r["metadata"]["indirect_object"])
                                 for r in rows])
  np.testing.assert_array_equal(ds.labels["incorrect"],
                                [first_id(gpt2_tok, " " + r["metadata"]["subject"]) for r in rows])
  want = [50256] + gpt2_tok.encode(rows[0]["s2_io_flip_counterfactual"]["prompt"]).ids
  np.testing.assert_array_equal(ds.corrupted[0, :len(want)], want)
  other = tasks.load_mib_task("ioi", FIXTURES / "ioi.jsonl", gpt2_tok, n_examples=2,
                              counterfactual="random_names_counterfactual")
  assert len(other) == 2 and not np.array_equal(other.corrupted, ds.corrupted[:2])


def test_mib_mcqa_arc_and_arithmetic(gpt2_tok):
  mcqa = tasks.load_mib_task("mcqa", FIXTURES / "mcqa.jsonl", gpt2_tok)
  rows = rows_of(FIXTURES / "mcqa.jsonl")
  np.testing.assert_array_equal(mcqa.labels["correct"], [
      first_id(gpt2_tok, r["choices"]["label"][r["answerKey"]]) for r in rows])
  cf = [r["symbol_counterfactual"] for r in rows]
  np.testing.assert_array_equal(mcqa.labels["incorrect"], [
      first_id(gpt2_tok, c["choices"]["label"][c["answerKey"]]) for c in cf])
  arc = tasks.load_mib_task("arc_easy", FIXTURES / "arc-easy", gpt2_tok, split="validation")
  assert len(arc) == 2 and arc.task.name == "arc-easy" and "validation" in arc.source
  assert len(tasks.load_mib_task("arc-easy", FIXTURES / "arc-easy", gpt2_tok)) == 1  # train split
  add = tasks.load_mib_task("arithmetic-addition", FIXTURES / "arithmetic.jsonl", gpt2_tok)
  # kept: "+" rows with a counterfactual and one-token labels (19 vs 24, 25 vs 16)
  np.testing.assert_array_equal(add.labels["correct"],
                                [first_id(gpt2_tok, "19"), first_id(gpt2_tok, "25")])
  sub = tasks.load_mib_task("arithmetic_subtraction", FIXTURES / "arithmetic.jsonl", gpt2_tok)
  np.testing.assert_array_equal(sub.labels["incorrect"], [first_id(gpt2_tok, "44")])
  assert tasks.is_mib_source(FIXTURES / "arc-easy") and not tasks.is_mib_source("x.csv")
  with pytest.raises(tasks.TaskError, match="no file of the split 'test'"):
    tasks.load_mib_task("arc-easy", FIXTURES / "arc-easy", gpt2_tok, split="test")
  with pytest.raises(tasks.TaskError, match="unknown MIB task"):
    tasks.load_mib_task("sva", FIXTURES / "mcqa.jsonl", gpt2_tok)
  with pytest.raises(tasks.TaskError, match="no such MIB data .* mib-bench/copycolors_mcqa"):
    tasks.load_mib_task("mcqa", FIXTURES / "absent", gpt2_tok)


# ---------------------------------------------------------------------------------------------
# The binaries


@pytest.mark.slow
def test_find_circuit_mib_out_and_evaluate_circuit_protocol_mib(gpt2_tok, tmp_path, capsys):
  import shutil
  import subprocess
  import sys
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=50257, n_embd=16, n_layer=2, n_head=2, n_positions=64, initializer_range=0.3))
  model_dir = tmp_path / "gpt2"
  hf.save_pretrained(str(model_dir))
  shutil.copy(TOKENIZER / "tokenizer.json", model_dir / "tokenizer.json")
  root = Path(__file__).resolve().parents[2]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))

  def run(module, **flags):
    args = [f"--{k}={v}" for k, v in flags.items()] + ["--compilation_cache="]
    r = subprocess.run([sys.executable, "-m", f"experiments.{module}"] + args, cwd=root, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r

  out, mib = tmp_path / "run", tmp_path / "mib"
  run("find_circuit", model=model_dir, task="mcqa", data=FIXTURES / "mcqa.jsonl", method="EAP",
      n_examples=3, batch_size=3, top_n=10, out=out, mib_out=mib, mib_model="gpt2")
  assert os.listdir(mib / "mcqa_gpt2") == ["importances.json"]
  doc = json.loads((out / "graph.json").read_text())
  assert doc["meta"]["score_convention"] == "loss"
  # The paper's hypernymy-comma by its own name, evaluated with MIB's protocol (the
  # evaluate_circuit binary's pipeline).
  config = report.EvaluateConfig(
      graph=str(out / "graph.json"), task="hypernymy-comma", n_examples=3, batch_size=3,
      data=str(FIXTURES.parent / "eap_ig" / "hypernymy-comma" / "gpt2.csv"), protocol="mib")
  capsys.readouterr()
  ev = report.evaluate_circuit(config, str(tmp_path / "eval"))
  assert "MIB protocol (edges, signed ranking)" in capsys.readouterr().out
  written = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
  assert written["mib"]["area_under"] == ev["mib"]["area_under"]
  assert ev["task"] == "hypernymy-comma" and len(ev["mib"]["faithfulnesses"]) == 10
  assert ev["mib"]["weighted_edge_counts"][-1] <= Graph.from_json(out / "graph.json").n_edges


def test_mib_published_circuit_round_trips(tmp_path):
  """MIB's own GPT-2 small circuit file reads as GPT-2 small's 32,491 edges with its circuit, in
  EAP-IG's sign ("loss": higher = more important), and writes back the same edges, scores and
  nodes, value for value (skipped without a MIB checkout at ../MIB-circuit-track or
  $JAXINTERP_MIB_REPO)."""
  path = MIB_REPO / "circuits" / "ioi-eap-ig.json"
  if not path.exists():
    pytest.skip(f"no MIB circuit file at {path}")
  original = json.loads(path.read_text())
  g = Graph.from_json(path)
  assert g.n_edges == 32491 and g.score_convention == "loss"
  assert g.count_edges() == sum(e["in_graph"] for e in original["edges"].values()) > 0
  g.to_json(tmp_path / "graph.json")
  back = json.loads((tmp_path / "graph.json").read_text())
  assert back["edges"] == {k: {"score": e["score"], "in_graph": e["in_graph"]}
                           for k, e in original["edges"].items()}
  assert {k: v["in_graph"] for k, v in back["nodes"].items()} == \
      {k: v["in_graph"] for k, v in original["nodes"].items()}
