"""Edge graph: layout and counts, EAP-IG JSON / npz IO, selection and pruning, evaluation math."""

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinterp import circuits as G
from jaxinterp.circuits import Graph, GraphError, GraphShape
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig


def gpt2_small_cfg():
  return ModelConfig(family="gpt2", d_model=768, n_layers=12, n_heads=12, d_head=64, d_mlp=3072,
                     d_vocab=50257)


def tiny_cfg(n_layers=2, n_heads=3, parallel=False, family="gpt2"):
  return ModelConfig(family=family, d_model=12, n_layers=n_layers, n_heads=n_heads, d_head=4,
                     d_mlp=16, d_vocab=11, parallel_attn_mlp=parallel)


def random_graph(cfg, seed=0):
  g = Graph.from_config(cfg)
  rng = np.random.default_rng(seed)
  return Graph.from_config(cfg,
                           rng.standard_normal((g.n_senders, g.n_receivers)).astype(np.float32))


def edge_count_formula(n_layers, n_heads, parallel):
  """Closed-form edge count, independent of the matrices: q/k/v + MLP + logits receivers."""
  total = 0
  for li in range(n_layers):
    upstream = 1 + li * (n_heads + 1)
    total += 3 * n_heads * upstream
    total += upstream + (0 if parallel else n_heads)
  return total + 1 + n_layers * (n_heads + 1)


def assert_no_dangling(g: Graph):
  """Every circuit edge joins circuit nodes; every circuit node has in- and out-edges."""
  nodes = g.nodes_in_graph
  s, r = np.nonzero(g.in_graph)
  assert nodes[s].all()
  assert np.append(nodes, True)[g.receiver_node[r]].all()
  out = g.in_graph.any(axis=1)
  inc = np.bincount(g.receiver_node, weights=g.in_graph.any(axis=0), minlength=g.n_nodes)[:-1] > 0
  inc[0] = True
  assert np.array_equal(nodes, out & inc)


# ------------------------------------------------------------------------------------------------
# Layout and counts
# ------------------------------------------------------------------------------------------------


def test_gpt2_small_counts():
  g = Graph.from_config(gpt2_small_cfg())
  assert g.n_nodes == 158
  assert g.n_edges == 32491
  assert g.n_edges == edge_count_formula(12, 12, False)
  assert g.scores.shape == g.in_graph.shape == g.valid.shape == (157, 445)
  assert g.scores.dtype == np.float32 and g.in_graph.dtype == bool


@pytest.mark.parametrize("n_layers,n_heads", [(1, 1), (3, 4), (6, 8)])
def test_neox_counts_follow_formula(n_layers, n_heads):
  cfg = tiny_cfg(n_layers, n_heads, parallel=True, family="gpt_neox")
  g = Graph.from_config(cfg)
  assert g.n_edges == edge_count_formula(n_layers, n_heads, True)
  seq = Graph.from_config(tiny_cfg(n_layers, n_heads, parallel=False))
  assert seq.n_edges - g.n_edges == n_layers * n_heads  # heads no longer feed their own MLP
  for li in range(n_layers):
    for h in range(n_heads):
      assert not g.valid[E.head_sender(cfg, li, h), E.mlp_receiver(cfg, li)]
      assert seq.valid[E.head_sender(cfg, li, h), E.mlp_receiver(cfg, li)]


def test_gqa_is_ungrouped():
  cfg = ModelConfig(family="llama", d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_head=4,
                    d_mlp=8, d_vocab=11, normalization="rmsnorm", positional="rotary",
                    rotary_dim=4)
  g = Graph.from_config(cfg)
  assert g.n_edges == edge_count_formula(2, 4, False)
  assert "input->a1.h3<k>" in json.dumps(g.to_dict())


def test_names_and_indices_round_trip():
  cfg = tiny_cfg(3, 2)
  g = Graph.from_config(cfg)
  assert g.edge_name(E.head_sender(cfg, 0, 1), E.head_receiver(cfg, 2, 1, "q")) == "a0.h1->a2.h1<q>"
  assert g.edge_name(0, E.mlp_receiver(cfg, 0)) == "input->m0"
  assert g.edge_name(E.mlp_sender(cfg, 2), E.logits_receiver(cfg)) == "m2->logits"
  assert g.edge_name(E.head_sender(cfg, 1, 0), E.mlp_receiver(cfg, 1)) == "a1.h0->m1"
  names = set()
  for s, r in zip(*np.nonzero(g.valid), strict=True):
    name = g.edge_name(int(s), int(r))
    assert g.edge_index(name) == (s, r)
    names.add(name)
  assert len(names) == g.n_edges
  assert g.node_index("logits") == g.n_senders and g.node_index("m1") == E.mlp_sender(cfg, 1)
  for bad in ("m2->a1.h0<q>", "a1.h0->a1.h1<q>", "a0.h0->a0.h0<v>", "a9.h0->logits", "input->m0<q>",
              "input", "m0->input"):
    with pytest.raises(GraphError):
      g.edge_index(bad)
  with pytest.raises(GraphError):
    g.edge_name(E.mlp_sender(cfg, 1), E.mlp_receiver(cfg, 0))


# ------------------------------------------------------------------------------------------------
# IO
# ------------------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
  cfg = tiny_cfg(3, 2)
  g = random_graph(cfg, seed=1).top_n(25, prune=False)
  g.node_attribution = np.linspace(-1, 1, g.n_senders).astype(np.float32)
  g.node_attribution[2] = np.nan  # unscored node
  path = tmp_path / "graph.json"
  meta = {"method": "EAP-IG-inputs", "seed": 3, "steps": 5}
  g.to_json(path, meta=meta)
  d = json.loads(path.read_text())
  assert d["cfg"] == {"n_layers": 3, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 12}
  assert len(d["edges"]) == g.n_edges and len(d["nodes"]) == g.n_nodes
  assert d["nodes"]["logits"] == {"in_graph": True}
  assert d["meta"] == meta
  assert not [p for p in os.listdir(tmp_path) if p != "graph.json"]  # no temp file left behind
  h = Graph.from_json(path, cfg)
  assert np.array_equal(h.scores, g.scores)  # float32 -> JSON -> float32 is exact
  assert np.array_equal(h.in_graph, g.in_graph)
  assert np.array_equal(h.nodes_in_graph, g.nodes_in_graph)
  np.testing.assert_array_equal(h.node_attribution, g.node_attribution)
  assert h.meta == meta
  # Without a config the shape comes from the file.
  k = Graph.from_json(path)
  assert isinstance(k.cfg, GraphShape) and k.cfg.d_model == 12
  assert np.array_equal(k.scores, g.scores)


def test_json_write_refuses_unserialisable_meta(tmp_path):
  g = random_graph(tiny_cfg())
  path = tmp_path / "graph.json"
  g.to_json(path)
  before = path.read_bytes()
  with pytest.raises(GraphError):
    g.to_json(path, meta={"key": object()})
  assert path.read_bytes() == before  # the old file is intact
  assert os.listdir(tmp_path) == ["graph.json"]


def test_reads_eap_ig_formats(tmp_path):
  cfg = tiny_cfg(2, 2)
  g = random_graph(cfg, seed=2).top_n(12)
  d = g.to_dict()
  # Newer EAP-IG: node scores, neuron masks that are all on, extra per-edge keys, no meta.
  new = {"cfg": dict(d["cfg"]), "nodes": {}, "edges": {}}
  for name, info in d["nodes"].items():
    new["nodes"][name] = {"in_graph": info["in_graph"], "score": 0.5, "neurons": [True] * 12,
                          "neurons_scores": [0.0] * 12}
  for name, info in d["edges"].items():
    new["edges"][name] = {**info, "qkv": name[-2] if name.endswith(">") else None}
  path = tmp_path / "new.json"
  path.write_text(json.dumps(new))
  h = Graph.from_json(path, cfg)
  assert np.array_equal(h.in_graph, g.in_graph) and np.array_equal(h.scores, g.scores)
  assert np.all(h.node_attribution == 0.5)
  # Older EAP-IG: nodes map to bare bools and cfg has no d_model.
  old = {"cfg": {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False},
         "nodes": {k: v["in_graph"] for k, v in d["nodes"].items()}, "edges": d["edges"]}
  path = tmp_path / "old.json"
  path.write_text(json.dumps(old))
  h = Graph.from_json(path, cfg)
  assert np.array_equal(h.in_graph, g.in_graph)
  assert np.array_equal(h.nodes_in_graph, g.nodes_in_graph)
  assert h.node_attribution is None
  # A partial file (only circuit edges) reads as in EAP-IG, unless all edges are required.
  part = {"cfg": d["cfg"], "nodes": d["nodes"],
          "edges": {k: v for k, v in d["edges"].items() if v["in_graph"]}}
  path = tmp_path / "part.json"
  path.write_text(json.dumps(part))
  h = Graph.from_json(path, cfg)
  assert np.array_equal(h.in_graph, g.in_graph)
  with pytest.raises(GraphError, match="missing"):
    Graph.from_json(path, cfg, require_all_edges=True)
  # Neuron-level circuits are read as such (`neurons_in_graph`), not as whole-node circuits.
  new["nodes"]["m0"]["neurons"][3] = False
  path = tmp_path / "neurons.json"
  path.write_text(json.dumps(new))
  h = Graph.from_json(path, cfg)
  m0 = h.node_index("m0")
  assert h.neurons_in_graph.shape == (h.n_senders, 12) and not h.neurons_in_graph[m0, 3]
  assert h.neurons_in_graph.sum() == h.n_senders * 12 - 1 and np.all(h.neuron_scores == 0)
  new["nodes"]["m0"]["neurons"].append(True)  # lists of different lengths are refused
  path.write_text(json.dumps(new))
  with pytest.raises(GraphError, match="neuron"):
    Graph.from_json(path, cfg)


def test_wrong_model_json_names_bad_edges(tmp_path):
  big = random_graph(tiny_cfg(3, 3))
  path = tmp_path / "big.json"
  big.to_json(path)
  with pytest.raises(GraphError) as e:
    Graph.from_json(path, tiny_cfg(2, 3))
  msg = str(e.value)
  assert "n_layers=3" in msg and "97 edge name(s)" in msg and "'input->a2.h0<q>'" in msg
  # Same shape but parallel blocks: heads -> own MLP edges do not exist there.
  seq = random_graph(tiny_cfg(2, 2))
  path = tmp_path / "seq.json"
  seq.to_json(path)
  with pytest.raises(GraphError) as e:
    Graph.from_json(path, tiny_cfg(2, 2, parallel=True, family="gpt_neox"))
  assert "a0.h0->m0" in str(e.value)
  # A smaller graph read into a bigger model: every name exists but the cfg disagrees.
  with pytest.raises(GraphError, match="n_layers"):
    Graph.from_json(path, tiny_cfg(3, 2))
  # A bogus edge name in an otherwise right file.
  d = seq.to_dict()
  d["edges"]["m1->a0.h0<q>"] = {"score": 1.0, "in_graph": True}
  with pytest.raises(GraphError, match=r"m1->a0\.h0<q>"):
    Graph.from_dict(d, tiny_cfg(2, 2))


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nonfinite_scores_raise(tmp_path, bad):
  cfg = tiny_cfg()
  text = json.dumps(random_graph(cfg).to_dict())
  name = "input->m1"
  i = text.index(f'"{name}": {{"score": ') + len(f'"{name}": {{"score": ')
  j = text.index(",", i)
  path = tmp_path / "g.json"
  path.write_text(text[:i] + bad + text[j:])
  with pytest.raises(GraphError, match=name):
    Graph.from_json(path, cfg)


def test_nonfinite_scores_refused_in_memory():
  g = Graph.from_config(tiny_cfg())
  s = np.zeros((g.n_senders, g.n_receivers), np.float32)
  s[0, -1] = np.nan
  with pytest.raises(GraphError, match="input->logits"):
    Graph.from_config(tiny_cfg(), s)


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"\xff\xfe\x00", b'{"cfg": 1}', b"null",
                                     b'{"cfg": {}, "nodes": {}, "edges": []}', b"[" * 100000])
def test_malformed_json_raises(tmp_path, content):
  path = tmp_path / "g.json"
  path.write_bytes(content)
  with pytest.raises(GraphError):
    Graph.from_json(path, tiny_cfg())


def test_missing_file_raises(tmp_path):
  with pytest.raises(GraphError):
    Graph.from_json(tmp_path / "nope.json", tiny_cfg())
  with pytest.raises(GraphError):
    Graph.from_npz(tmp_path / "nope.npz", tiny_cfg())


def test_npz_round_trip(tmp_path):
  cfg = tiny_cfg(3, 2, parallel=True, family="gpt_neox")
  g = random_graph(cfg, seed=4).greedy(30)
  g.meta = {"model": "tiny"}
  path = tmp_path / "scores.npz"
  g.to_npz(path)
  h = Graph.from_npz(path, cfg)
  assert np.array_equal(h.scores, g.scores) and np.array_equal(h.in_graph, g.in_graph)
  assert np.array_equal(h.nodes_in_graph, g.nodes_in_graph) and h.meta == {"model": "tiny"}
  assert Graph.from_npz(path).n_edges == g.n_edges
  with pytest.raises(GraphError, match="n_layers=3"):
    Graph.from_npz(path, tiny_cfg(2, 2))
  # NaN written behind our back is caught on read; a non-npz file is a GraphError.
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["scores"][0, -1] = np.inf
  np.savez(path, **arrays)
  with pytest.raises(GraphError, match="input->logits"):
    Graph.from_npz(path, cfg)
  path.write_bytes(b"not a zip")
  with pytest.raises(GraphError):
    Graph.from_npz(path, cfg)


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


def test_top_n_selects_best_edges_and_is_monotone():
  g = random_graph(tiny_cfg(3, 3), seed=5)
  for absolute in (True, False):
    prev_raw, prev = None, None
    for n in range(0, g.n_edges + 1, 17):
      raw = g.top_n(n, absolute=absolute, prune=False)
      assert raw.count_edges() == n
      key = np.abs(g.scores) if absolute else g.scores
      if 0 < n < g.n_edges:
        assert key[raw.in_graph].min() >= key[g.valid & ~raw.in_graph].max()
      pruned = g.top_n(n, absolute=absolute)
      assert not (pruned.in_graph & ~raw.in_graph).any()
      if prev is not None:
        assert not (prev_raw.in_graph & ~raw.in_graph).any()
        assert not (prev.in_graph & ~pruned.in_graph).any()
      prev_raw, prev = raw, pruned
    assert g.top_n(g.n_edges).count_edges() == g.n_edges
  with pytest.raises(GraphError):
    g.top_n(g.n_edges + 1)
  with pytest.raises(GraphError):
    g.top_n(-1)


def test_threshold():
  g = random_graph(tiny_cfg(2, 2), seed=6)
  t = 0.8
  raw = g.threshold(t, prune=False)
  assert np.array_equal(raw.in_graph, g.valid & (np.abs(g.scores) >= t))
  signed = g.threshold(t, absolute=False, prune=False)
  assert np.array_equal(signed.in_graph, g.valid & (g.scores >= t))
  assert_no_dangling(g.threshold(t))
  with pytest.raises(GraphError):
    g.threshold(float("nan"))


def test_prune_removes_dangling_and_is_idempotent():
  cfg = tiny_cfg(3, 2)
  g = Graph.from_config(cfg)
  s = g.edge_index
  mask = np.zeros_like(g.valid)
  keep = ["input->a0.h0<q>", "a0.h0->m1", "m1->logits"]  # a full path
  dangling = ["a0.h1->a2.h0<k>",  # a0.h1 has no input, a2.h0 no output
              "input->a1.h1<v>",  # a1.h1 has no output
              "m2->logits"]       # m2 has no input
  for name in keep + dangling:
    mask[s(name)] = True
  p = g.with_edges(mask).prune()
  assert {p.edge_name(int(a), int(b))
          for a, b in zip(*np.nonzero(p.in_graph), strict=True)} == set(keep)
  assert [p.node_names[i] for i in np.flatnonzero(p.nodes_in_graph)] == ["input", "a0.h0", "m1"]
  assert_no_dangling(p)
  q = p.prune()
  assert np.array_equal(q.in_graph, p.in_graph)
  assert np.array_equal(q.nodes_in_graph, p.nodes_in_graph)
  # Receiver-side node membership and the EdgePatch weights of the circuit.
  rin = p.receivers_in_graph()
  assert rin[E.head_receiver(cfg, 0, 0, "k")] and rin[E.mlp_receiver(cfg, 1)] and rin[-1]
  assert not rin[E.mlp_receiver(cfg, 2)]
  w = p.edge_weights()
  assert w.dtype == np.float32 and w.sum() == 3 and w[s("m1->logits")] == 1


def test_full_and_empty():
  g = random_graph(tiny_cfg(2, 2, parallel=True, family="gpt_neox"))
  full, empty = g.full(), g.empty()
  assert full.count_edges() == g.n_edges and full.count_nodes() == g.n_nodes
  assert empty.count_edges() == 0 and empty.count_nodes() == 1  # logits only
  assert np.array_equal(full.prune().in_graph, full.in_graph)
  assert np.array_equal(full.scores, g.scores)


def test_greedy_grows_from_logits():
  g = random_graph(tiny_cfg(3, 3), seed=7)
  for n in (1, 5, 40, g.n_edges):
    raw = g.greedy(n, prune=False)
    assert raw.count_edges() == n
    # Every circuit edge feeds a node already connected to the logits.
    s, r = np.nonzero(raw.in_graph)
    child = g.receiver_node[r]
    assert np.all((child == g.n_senders) | raw.nodes_in_graph[np.minimum(child, g.n_senders - 1)])
    assert raw.in_graph[:, -1].any()
    assert_no_dangling(g.greedy(n))
  # The first greedy edge is the best edge into the logits.
  first = g.greedy(1, prune=False)
  best = np.argmax(np.abs(g.scores[:, -1]))
  assert first.in_graph[best, -1]
  # An edge that scores highest but is not reachable from the logits first is not taken at n = 1.
  scores = np.array(g.scores)
  scores[g.edge_index("input->a0.h0<q>")] = 100.0
  h = Graph.from_config(g.cfg, scores).greedy(1, prune=False)
  assert not h.in_graph[h.edge_index("input->a0.h0<q>")]


def test_node_scores_and_node_level_top_n():
  cfg = tiny_cfg(2, 2)
  g = random_graph(cfg, seed=8)
  ns = g.node_scores()
  np.testing.assert_allclose(ns, np.where(g.valid, np.abs(g.scores), 0).sum(1), rtol=1e-6)
  np.testing.assert_allclose(g.node_scores(absolute=False), np.where(g.valid, g.scores, 0).sum(1),
                             rtol=1e-5, atol=1e-6)
  custom = np.zeros(g.n_senders)
  chosen = [0, E.head_sender(cfg, 0, 1), E.mlp_sender(cfg, 1)]
  custom[chosen] = [1.0, 3.0, 2.0]
  scored = g.replace(node_attribution=custom)
  c = scored.top_n(3, level="node", prune=False)
  kept = set(chosen)
  s, r = np.nonzero(c.in_graph)
  assert set(s.tolist()) <= kept
  assert set(g.receiver_node[r].tolist()) <= kept | {g.n_senders}
  # Every valid edge between kept nodes is in: input->a0.h1 (qkv), input/a0.h1->m1, all three
  # ->logits.
  assert c.count_edges() == 3 + 2 + 3
  pruned = scored.top_n(3, level="node")
  assert_no_dangling(pruned)
  kept_names = [g.node_names[i] for i in np.flatnonzero(pruned.nodes_in_graph)]
  assert kept_names == ["input", "a0.h1", "m1"]
  # The input node is ranked like the others (EAP-IG's rule): left out, nothing reaches the logits.
  # a0.h1->m1, a0.h1->logits, m1->logits
  assert scored.top_n(2, level="node", prune=False).count_edges() == 1 + 1 + 1
  assert scored.top_n(2, level="node").count_edges() == 0
  # NaN = unscored, always kept; the signed ranking follows the score convention.
  partly = g.replace(node_attribution=np.where(np.arange(g.n_senders) == 0, np.nan, custom))
  assert partly.top_n(2, level="node").nodes_in_graph[0]
  metric = Graph(cfg, meta={"score_convention": "metric"}, node_attribution=-custom)
  np.testing.assert_array_equal(metric.top_n(3, level="node", absolute=False).in_graph,
                                pruned.in_graph)
  with pytest.raises(GraphError, match="node scores"):
    g.top_n(1, level="node")
  with pytest.raises(GraphError):
    scored.top_n(g.n_senders + 1, level="node")
  with pytest.raises(GraphError, match="level"):
    scored.top_n(1, level="head")


# ------------------------------------------------------------------------------------------------
# Evaluation math
# ------------------------------------------------------------------------------------------------


def test_normalized_faithfulness():
  assert G.normalized_faithfulness(2.0, 4.0, 1.0) == pytest.approx(1 / 3)
  assert G.normalized_faithfulness(4.0, 4.0, 1.0) == 1.0
  assert G.normalized_faithfulness(1.0, 4.0, 1.0) == 0.0
  np.testing.assert_allclose(G.normalized_faithfulness([1.0, 2.5, 5.5], 4.0, 1.0), [0.0, 0.5, 1.5])
  with pytest.raises(GraphError):
    G.normalized_faithfulness(1.0, 2.0, 2.0)
  with pytest.raises(GraphError):
    G.normalized_faithfulness(float("nan"), 2.0, 1.0)


def test_cpr_cmd_hand_computed():
  pct = [1.0, 10.0, 100.0]
  f = [0.2, 0.8, 1.1]
  # x = 0.01, 0.1, 1.0: areas 0.09 * (0.2 + 0.8) / 2 + 0.9 * (0.8 + 1.1) / 2 = 0.045 + 0.855.
  assert G.cpr(pct, f) == pytest.approx(0.9)
  # |1 - f| = 0.8, 0.2, 0.1: 0.09 * 0.5 + 0.9 * 0.15 = 0.045 + 0.135.
  assert G.cmd(pct, f) == pytest.approx(0.18)
  # Over the MIB grid a perfect circuit has CPR 0.999 (x spans 0.001 .. 1) and CMD 0.
  ones = [1.0] * len(G.MIB_PERCENTAGES)
  assert G.MIB_PERCENTAGES == (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
  assert G.cpr(G.MIB_PERCENTAGES, ones) == pytest.approx(0.999)
  assert G.cmd(G.MIB_PERCENTAGES, ones) == pytest.approx(0.0)
  # A curve crossing 1: CMD counts overshoot as distance too.
  assert G.cmd([50.0, 100.0], [1.5, 0.5]) == pytest.approx(0.25)
  for bad in (([10.0], [1.0]), ([10.0, 5.0], [1.0, 1.0]), ([0.0, 5.0], [1.0, 1.0]),
              ([10.0, 200.0], [1.0, 1.0]), ([1.0, 2.0], [1.0]), ([1.0, 2.0], [1.0, float("nan")])):
    with pytest.raises(GraphError):
      G.cpr(*bad)


def test_n_edges_at_percentage_matches_mib():
  assert [G.n_edges_at_percentage(p, 32491) for p in G.MIB_PERCENTAGES] == \
      [int(f * 32491) for f in (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)]
  assert G.n_edges_at_percentage(100, 7) == 7 and G.n_edges_at_percentage(0, 7) == 0
  with pytest.raises(GraphError):
    G.n_edges_at_percentage(101, 7)


def test_iou_hand_made():
  cfg = tiny_cfg(2, 2)
  g = Graph.from_config(cfg)

  def circuit(names):
    mask = np.zeros_like(g.valid)
    for n in names:
      mask[g.edge_index(n)] = True
    return g.with_edges(mask)

  a = circuit(["input->a0.h0<q>", "a0.h0->logits", "input->m1", "m1->logits"])
  b = circuit(["input->a0.h0<q>", "a0.h0->logits", "input->a1.h1<v>", "a1.h1->logits"])
  assert G.edge_iou(a, b) == pytest.approx(2 / 6)
  # nodes: a = {input, a0.h0, m1}, b = {input, a0.h0, a1.h1}
  assert G.node_iou(a, b) == pytest.approx(2 / 4)
  assert G.edge_iou(a, a) == 1.0 and G.node_iou(a, a) == 1.0
  assert G.edge_iou(g.empty(), g.empty()) == 1.0
  assert G.edge_iou(a, g.empty()) == 0.0
  with pytest.raises(GraphError):
    G.edge_iou(a, Graph.from_config(tiny_cfg(3, 2)))


# ------------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------------


def on_input_logits_path(g: Graph) -> np.ndarray:
  """Brute force: circuit edges (s, r) with s reachable from the input and r's node reaching
  logits."""
  adj = np.zeros((g.n_nodes, g.n_nodes), bool)  # node -> node through circuit edges
  for s, r in zip(*np.nonzero(g.in_graph), strict=True):
    adj[s, g.receiver_node[r]] = True
  from_input = np.zeros(g.n_nodes, bool)
  from_input[0] = True
  to_logits = np.zeros(g.n_nodes, bool)
  to_logits[-1] = True
  for _ in range(g.n_nodes):
    from_input |= (adj & from_input[:, None]).any(axis=0)
    to_logits |= (adj & to_logits[None, :]).any(axis=1)
  return g.in_graph & from_input[:g.n_senders, None] & to_logits[g.receiver_node][None, :]


@st.composite
def small_graphs(draw):
  cfg = GraphShape(draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.booleans()))
  g = Graph.from_config(cfg)
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  scores = rng.standard_normal(g.valid.shape).astype(np.float32)
  if draw(st.booleans()):  # many ties
    scores = np.round(scores)
  density = draw(st.floats(0.0, 1.0))
  mask = rng.random(g.valid.shape) < density
  return Graph.from_config(cfg, scores).with_edges(mask)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_graphs())
def test_prop_prune_idempotent(g):
  p = g.prune()
  assert_no_dangling(p)
  assert np.array_equal(p.in_graph, on_input_logits_path(g))
  assert not (p.in_graph & ~g.in_graph).any()
  q = p.prune()
  assert np.array_equal(q.in_graph, p.in_graph)
  assert np.array_equal(q.nodes_in_graph, p.nodes_in_graph)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_graphs(), st.data())
def test_prop_top_n_monotone(g, data):
  n1 = data.draw(st.integers(0, g.n_edges))
  n2 = data.draw(st.integers(n1, g.n_edges))
  absolute = data.draw(st.booleans())
  for prune in (False, True):
    a, b = g.top_n(n1, absolute, prune=prune), g.top_n(n2, absolute, prune=prune)
    assert not (a.in_graph & ~b.in_graph).any()
    assert not (a.nodes_in_graph & ~b.nodes_in_graph).any()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) |
    st.text(max_size=12),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=20)


@st.composite
def mutated_graph_dicts(draw):
  """Valid-looking graph dicts with a few random corruptions."""
  cfg = tiny_cfg(1, 2)
  d = random_graph(cfg, seed=draw(st.integers(0, 5))).top_n(5).to_dict(meta={"seed": 1})
  for _ in range(draw(st.integers(0, 3))):
    section = draw(st.sampled_from(["root", "cfg", "nodes", "edges", "edge_info", "node_info"]))
    value = draw(json_values)
    if section == "root":
      d[draw(st.sampled_from(["cfg", "nodes", "edges", "meta", "other"]))] = value
    elif section in ("cfg", "nodes", "edges") and isinstance(d.get(section), dict):
      keys = list(d[section]) + [draw(st.text(max_size=12))]
      d[section][draw(st.sampled_from(keys))] = value
    elif section == "edge_info" and isinstance(d.get("edges"), dict) and d["edges"]:
      name = draw(st.sampled_from(sorted(d["edges"])))
      if isinstance(d["edges"][name], dict):
        d["edges"][name][draw(st.sampled_from(["score", "in_graph", "qkv"]))] = value
    elif section == "node_info" and isinstance(d.get("nodes"), dict) and d["nodes"]:
      name = draw(st.sampled_from(sorted(d["nodes"])))
      if isinstance(d["nodes"][name], dict):
        d["nodes"][name][draw(st.sampled_from(["score", "in_graph", "neurons"]))] = value
  return d


def _load_or_graph_error(path, cfg):
  try:
    g = Graph.from_json(path, cfg)
  except GraphError:
    return None
  # Whatever loads is a consistent, finite graph.
  assert np.isfinite(g.scores).all()
  assert not (g.in_graph & ~g.valid).any()
  return g


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.one_of(mutated_graph_dicts(), json_values), st.booleans())
def test_fuzz_from_json_only_raises_graph_error(tmp_path, d, with_cfg):
  path = tmp_path / "fuzz.json"
  path.write_text(json.dumps(d))  # NaN/Infinity literals included, as Python writes them
  _load_or_graph_error(path, tiny_cfg(1, 2) if with_cfg else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_fuzz_from_json_random_bytes(tmp_path, raw):
  path = tmp_path / "fuzz.json"
  path.write_bytes(raw)
  _load_or_graph_error(path, tiny_cfg(1, 2))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["n_layers", "n_heads", "parallel_attn_mlp", "d_model"]),
                       json_values | st.integers(-3, 400)))
def test_fuzz_from_dict_cfg_section(jcfg):
  try:
    g = Graph.from_dict({"cfg": jcfg, "nodes": {}, "edges": {}})
  except GraphError:
    return
  assert g.count_edges() == 0
