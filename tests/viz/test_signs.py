"""One sign and one scale per quantity: every output of one run shows the same number.

find_circuit: the console's top edges, graph.json, the HTML viewer's data and the edges the PNG is
drawn from (`plots.drawn_edges`) all hold the file's sign (higher = more important), which
`convention.displayed` gives from the in-memory scores of scores.npz. activation_patching: the
console's strongest cell, patching.json, the .npz's `normalized` and the grid the PNG is drawn from
(`plots.patching_grid`) hold one normalised number.
"""

from __future__ import annotations

import json
import re
import types

import jax
import numpy as np
import pytest

from jaxinterp import models
from jaxinterp.circuits import Graph, convention
from jaxinterp.discovery import FindCircuitConfig, find_circuit
from jaxinterp.evaluation.faithfulness import FaithfulnessCurve
from jaxinterp.patching import pipeline
from jaxinterp.viz import plots, viewer

CFG = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32,
                         d_vocab=40, n_ctx=32, bos_token_id=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  params = models.init_params(CFG, jax.random.PRNGKey(1))
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, params)  # visible effects
  out = tmp_path_factory.mktemp("tiny_model")
  models.save_converted(models.Model(CFG, params, None, None), str(out))
  return str(out)


def _page_json(html: str) -> dict:
  m = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', html, re.S)
  return json.loads(m.group(1).replace("<\\/", "</").replace("<\\!--", "<!--"))


def test_displayed_equals_the_file_bit_for_bit(tmp_path):
  rng = np.random.default_rng(0)
  scores = rng.normal(size=Graph.from_config(CFG).valid.shape).astype(np.float32)
  scores[0, :3] = [0.0, -0.0, 1e-30]
  for conv in convention.CONVENTIONS:
    g = Graph.from_config(CFG, np.where(Graph.from_config(CFG).valid, scores, 0), conv)
    shown = convention.displayed(g.scores, conv)
    g.to_json(str(tmp_path / f"{conv}.json"))
    back = Graph.from_json(str(tmp_path / f"{conv}.json"), CFG)  # the file's sign, as written
    assert back.score_convention == convention.LOSS
    assert np.array_equal(shown.view(np.uint32), back.scores.view(np.uint32)), conv
    assert shown.dtype == np.float32 and not np.signbit(shown[shown == 0]).any()
    s = float(g.scores[1, 2])
    assert convention.displayed(s, conv) == float(shown[1, 2])
  assert convention.displayed(2.0, convention.METRIC) == -2.0
  assert convention.displayed(2.0, convention.LOSS) == 2.0


def test_find_circuit_outputs_agree(model_dir, tmp_path, capsys):
  out = tmp_path / "run"
  find_circuit(FindCircuitConfig(model=model_dir, method="EAP", n_examples=8, batch_size=4,
                                 top_n=10), str(out))
  console = capsys.readouterr().out
  npz = np.load(out / "scores.npz")
  conv = json.loads(str(npz["meta"]))[convention.KEY]
  assert conv == convention.METRIC  # in memory: important edges are negative
  shown = convention.displayed(npz["scores"], conv)  # what every output must show

  graph = Graph.from_json(str(out / "graph.json"), CFG)
  assert graph.score_convention == convention.LOSS
  assert np.array_equal(graph.scores[graph.valid], shown[graph.valid])

  d = _page_json((out / "circuit.html").read_text())
  s, r = np.asarray(d["edges"]["s"]), np.asarray(d["edges"]["r"])
  assert np.array_equal(np.asarray(d["edges"]["score"], np.float32), shown[s, r])
  assert d["score_legend"] == convention.DISPLAYED

  drawn = Graph.from_config(CFG, npz["scores"], conv).replace(in_graph=npz["in_graph"])
  ds, dr, dv = plots.drawn_edges(drawn)
  assert len(dv) == int(npz["in_graph"].sum()) > 0
  assert np.array_equal(dv, graph.scores[ds, dr])

  assert f"(score: {convention.DISPLAYED})" in console
  lines = re.findall(r"^  (\S+->\S+)\s+([+-]\d+\.\d{4})$", console, re.M)
  assert len(lines) == 10
  for name, value in lines:
    assert float(value) == pytest.approx(float(graph.scores[graph.edge_index(name)]), abs=5e-5)


def test_activation_patching_outputs_agree(model_dir, tmp_path, capsys):
  out = tmp_path / "ap"
  results = pipeline.activation_patching(pipeline.PatchingConfig(
      model=model_dir, task="induction", n_examples=4, batch_size=4,
      sweeps="resid_pre,head_out,head_out_by_pos"), str(out))
  console = capsys.readouterr().out
  doc = json.loads((out / "patching.json").read_text())
  assert doc["normalized"] == plots.NORMALIZED and doc["no_effect"] == 1.0
  assert plots.NORMALIZED in console
  found = 0
  for name, r in results.items():
    npz = np.load(out / f"{name}.npz")
    assert np.array_equal(npz["normalized"], r.normalized)
    labels = tuple(str(x) for x in npz["axis_labels"])
    result = types.SimpleNamespace(normalized=npz["normalized"], axis_labels=labels,
                                   direction=str(npz["direction"]))
    grid = plots.patching_grid(result)
    assert grid.neutral == 1.0
    line = re.search(rf"^  {name}\s+\(.*?\)\s+strongest cell: (.*) -> ([+-]\d\.\d{{3}})$",
                     console, re.M)
    top = doc["sweeps"][name]["strongest"]
    if line is None:
      assert top is None and f"  {name}" in console
      continue
    found += 1
    cell = dict(part.rsplit(" ", 1) for part in line.group(1).split(", "))
    cell = {k: int(v) for k, v in cell.items()}
    assert cell == top["cell"]
    idx = tuple(cell[a] for a in labels)
    value = float(npz["normalized"][idx])
    assert top["normalized"] == value
    assert float(line.group(2)) == pytest.approx(value, abs=5e-4)
    if len(labels) == 2:
      assert grid.values[idx] == value
    else:  # head_out_by_pos: one row per (layer, head), positions as columns
      n_heads = npz["normalized"].shape[2]
      row = cell["layer"] * n_heads + cell["head"]
      assert grid.values[row, cell["position"]] == value
      assert grid.row_labels[row] == f"a{cell['layer']}.h{cell['head']}"
  assert found >= 2


def test_viewer_shows_the_files_sign_for_metric_graphs():
  valid = Graph.from_config(CFG).valid
  scores = np.where(valid, np.random.default_rng(1).normal(size=valid.shape), 0).astype(np.float32)
  g = Graph.from_config(CFG, scores, convention.METRIC)
  d = viewer.page_data(g)
  s, r = np.asarray(d["edges"]["s"]), np.asarray(d["edges"]["r"])
  assert np.array_equal(np.asarray(d["edges"]["score"], np.float32), -scores[s, r])
  assert d["edges"]["rank"] == viewer.page_data(g.replace(meta={}))["edges"]["rank"]  # |score|


def test_faithfulness_rows_never_write_negative_zero():
  curve = FaithfulnessCurve(np.array([0, 3]), np.array([0, 2]), np.array([-0.0, 2.5]),
                            np.array([-0.0, 1.0]), np.array([-0.0, -0.5]), 1.0, -0.0)
  rows = curve.rows()
  assert [r["faithfulness"] for r in rows] == [0.0, -0.5]
  assert not any(np.signbit(v) for r in rows for k, v in r.items() if v == 0)
  assert "-0.0" not in repr(rows)
