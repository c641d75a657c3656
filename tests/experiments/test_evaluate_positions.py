"""evaluate_circuit on find_circuit's position- and span-level graph.json: the same faithfulness and
curve rows as the run that found the circuit, --top_n re-selection, the files, and the edge-level
options refused in one line naming the flag."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits import span_circuits as SC
from jaxinterp.circuits.layout import GraphShape
from jaxinterp.discovery import FindCircuitConfig, find_circuit
from jaxinterp.evaluation import position_report as PR
from jaxinterp.evaluation import report
from jaxinterp.runtime import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _find(out: str, **extra) -> dict:
  """A cheap find_circuit --level=position run on the bundled toy model; graph.json's object."""
  find_circuit(FindCircuitConfig(**dict(dict(
      model="toy", method="EAP-IG-inputs", n_examples=4, batch_size=4, top_n=12,
      options={"level": "position"}), **extra)), out)
  with open(os.path.join(out, "graph.json")) as f:
    return json.load(f)


def _rows(path: str) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def _assert_same_curve(found: str, evaluated: str) -> None:
  a, b = _rows(found), _rows(evaluated)
  assert [r["n_edges"] for r in a] == [r["n_edges"] for r in b]
  for ra, rb in zip(a, b, strict=True):
    for k in ("percentage", "metric", "faithfulness"):
      assert abs(float(ra[k]) - float(rb[k])) <= 1e-6, (k, ra, rb)


@pytest.mark.slow
def test_position_graph_evaluates_as_found(tmp_path, capsys):
  run = str(tmp_path / "run")
  d = _find(run)
  graph = os.path.join(run, "graph.json")
  assert PR.graph_level(graph) == "position"
  rep = report.evaluate_circuit(report.EvaluateConfig(graph=graph, batch_size=4))
  out = os.path.join(run, "evaluation")
  assert sorted(os.listdir(out)) == ["DONE", "circuit.html", "circuit.png", "evaluation.json",
                                     "faithfulness.csv", "faithfulness.png", "run.json"]
  assert rep["level"] == "position" and rep["selection"] == "in_graph"
  assert rep["n_edges"] == 12 and rep["n_edges_total"] == d["meta"]["n_position_edges"]
  assert abs(rep["faithfulness"] - d["meta"]["faithfulness"]) <= 1e-6
  assert abs(rep["metric_full"] - d["meta"]["m_full"]) <= 1e-6
  assert abs(rep["metric_empty"] - d["meta"]["m_empty"]) <= 1e-6
  _assert_same_curve(os.path.join(run, "faithfulness.csv"), os.path.join(out, "faithfulness.csv"))
  assert 0.0 <= rep["CMD"] and np.isfinite(rep["CPR"])
  with open(os.path.join(out, "evaluation.json")) as f:
    assert json.load(f)["faithfulness"] == rep["faithfulness"]
  html = open(os.path.join(out, "circuit.html"), encoding="utf-8").read()
  assert '"mode":"position"' in html and "a1.h0@31->logits@31" in html
  assert "faithfulness" in capsys.readouterr().out
  # --top_n re-selects the top-n position edges of positions.npz: the curve's row at n.
  rep20 = report.evaluate_circuit(report.EvaluateConfig(graph=graph, batch_size=4, top_n=20),
                                  str(tmp_path / "top20"))
  row20 = [r for r in _rows(os.path.join(run, "faithfulness.csv")) if r["n_edges"] == "20"][0]
  assert rep20["n_edges"] == 20 and rep20["selection"].startswith("top_n=20")
  assert abs(rep20["faithfulness"] - float(row20["faithfulness"])) <= 1e-6
  # A positions.npz that disagrees with graph.json is refused; the binary says so in one line.
  alone = tmp_path / "alone"
  alone.mkdir()
  (alone / "graph.json").write_text(json.dumps(d))
  every = cpos.from_npz(os.path.join(run, "positions.npz"))
  s, ps, r, _ = cpos.parse_edge_name(every.layout, next(iter(d["edges"])))
  every.local[ps, s, r] += 1.0
  cpos.to_npz(every, alone / "positions.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, "-m", "experiments.evaluate_circuit",
                      f"--graph={alone / 'graph.json'}", "--batch_size=4"], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert p.stderr.strip().splitlines()[-1].endswith("holds other scores than graph.json (from "
                                                    "another run?)"), p.stderr
  assert not (alone / "evaluation").exists()


@pytest.mark.slow
def test_span_graph_evaluates_as_found(tmp_path):
  run = str(tmp_path / "run")
  d = _find(run, schema="induction")
  graph = os.path.join(run, "graph.json")
  assert PR.graph_level(graph) == "span"
  out = str(tmp_path / "ev")
  rep = report.evaluate_circuit(report.EvaluateConfig(graph=graph, batch_size=4), out)
  assert sorted(os.listdir(out)) == ["DONE", "circuit.png", "evaluation.json", "faithfulness.csv",
                                     "faithfulness.png", "run.json"]
  assert os.path.getsize(os.path.join(out, "circuit.png")) > 10_000  # the span circuit drawn
  assert rep["level"] == "span" and rep["schema"] == "induction" and rep["n_edges"] == 12
  assert rep["n_edges_total"] == d["meta"]["n_span_edges"] == SC.n_edges(
      SC.from_npz(os.path.join(run, "spans.npz")))
  assert abs(rep["faithfulness"] - d["meta"]["faithfulness"]) <= 1e-6
  _assert_same_curve(os.path.join(run, "faithfulness.csv"), os.path.join(out, "faithfulness.csv"))
  assert 0.0 <= rep["CMD"] and np.isfinite(rep["CPR"])


def test_edge_level_options_refused_in_one_line(tmp_path):
  shape = GraphShape(2, 4, False)
  local, crossing = (np.zeros(m.shape, np.float32) for m in cpos.edge_masks(shape, 3))
  graph = str(tmp_path / "graph.json")
  cpos.to_json(cpos.PositionScores(shape, local, crossing), graph, meta={"model": "toy"})
  edge = tmp_path / "edge.json"
  edge.write_text(json.dumps({"edges": {}, "nodes": {}}))
  out = str(tmp_path / "out")
  for extra, message in [
      (dict(protocol="mib"), "--protocol=mib: MIB's protocol ranks edge-level graphs; --graph is "
                             "a position-level one"),
      (dict(mib_level="node"), "--mib_level=node: MIB's protocol ranks edge-level graphs"),
      (dict(log_scale=True), "--log_scale: MIB's protocol"),
      (dict(mib_absolute=True), "--mib_absolute: MIB's protocol"),
      (dict(compare=str(edge)), "--compare is an edge-level graph and --graph a position-level "
                                "one: circuits are compared at one level"),
      (dict(graph=str(edge), compare=graph), "--compare is a position-level graph and --graph an "
                                             "edge-level one"),
  ]:
    config = report.EvaluateConfig(**dict(dict(graph=graph), **extra))
    with pytest.raises(inputs.InputError) as e:
      report.evaluate_circuit(config, out)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(out)
