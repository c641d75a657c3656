"""find_circuit --level=position: the outputs, their names, the bundled model's K-composition
position edge; methods and settings without position-level scores are refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp.circuits import positions as cpos
from jaxinterp.discovery import FindCircuitConfig, find_circuit
from jaxinterp.groundtruth import toy
from jaxinterp.runtime import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**extra):
  return FindCircuitConfig(**dict(dict(model="toy", method="EAP-IG-inputs", n_examples=8,
                                       batch_size=8, top_n=12, options={"level": "position"}),
                                  **extra))


@pytest.mark.slow
def test_level_position_outputs_and_k_composition(tmp_path, capsys):
  out = str(tmp_path / "run")
  summary = find_circuit(_config(), out)
  stdout = capsys.readouterr().out
  assert "circuit: top 12 position edges; faithfulness" in stdout
  assert "top position edges" in stdout
  assert summary["level"] == "position" and summary["n_edges"] == 12
  assert 0.0 < summary["faithfulness"] <= 1.2
  assert sorted(os.listdir(out)) == ["DONE", "circuit.html", "circuit.png", "faithfulness.csv",
                                     "faithfulness.png", "graph.json", "positions.npz", "run.json"]
  with open(os.path.join(out, "graph.json")) as f:
    d = json.load(f)
  assert d["meta"]["level"] == "position" and d["meta"]["score_convention"] == "loss"
  assert d["meta"]["top_n"] == 12 and d["meta"]["method"] == "EAP-IG-inputs"
  scores = cpos.from_npz(os.path.join(out, "positions.npz"))  # every score, graph.json's sign
  lay = scores.layout
  assert len(d["edges"]) == 12
  for name in d["edges"]:
    cpos.parse_edge_name(lay, name)  # GraphError unless a position edge of this model
  # graph.json's circuit = the 12 best position edges of positions.npz, by |score|
  assert list(d["edges"]) == [n for n, _ in scores.names(scores.select(12))]
  assert [n for n, _ in summary["top_edges"]] == list(d["edges"])[:10]
  # The target: a0.h3 at the position after the final token's earlier occurrence -> a1.h0<k>.
  ds = toy.induction_task_dataset(8, seed=0)
  clean = np.asarray(ds.clean)
  last = clean.shape[1] - 1
  earlier = {int(np.flatnonzero(row[:last] == row[last])[0]) for row in clean}
  assert len(earlier) == 1 and scores.n_pos == clean.shape[1]
  top = scores.top(1, receiver="a1.h0<k>")[0][0]
  assert top == f"a0.h3@{earlier.pop() + 1}->a1.h0<k>@{last}", top
  # The same run again is complete, untouched.
  again = find_circuit(_config(), out)
  assert again["complete"] and again["level"] == "position"
  # The binary: a method without position-level scores is refused in one line.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-m", "experiments.find_circuit", "--method=UGS",
                      "--level=position", f"--out={tmp_path / 'ugs'}"], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().count("\n") == 0 and "UGS scores edges only" in r.stderr, r.stderr
  assert not os.path.exists(tmp_path / "ugs")


def test_level_position_refusals_are_one_line(tmp_path):
  out = str(tmp_path / "x")
  for config, message in [
      (_config(method="UGS"), "UGS scores edges only; level='position' works with ['EAP', "
                              "'EAP-IG-inputs', 'EAP-IG-activations', 'clean-corrupted', 'exact']"),
      (_config(method="EAP+EAP-IG-inputs"), "--level=position works with --method=EAP, "),
      (_config(bootstrap=4), "--bootstrap resamples edge, node or neuron scores"),
      (_config(mesh="1x1"), "--mesh shards edge-level attribution"),
      (_config(intervention="optimal"), "--intervention=optimal works with --level=edge"),
      (_config(selection="greedy"), "--selection=greedy selects edges"),
      (_config(mib_out=out), "--mib_out writes edge scores"),
  ]:
    with pytest.raises(inputs.InputError) as e:
      find_circuit(config, out)
    assert message in str(e.value) and "\n" not in str(e.value), (message, str(e.value))
    assert not os.path.exists(out)
  with pytest.raises(A.AttributionError, match="call attribution.positions.attribute_positions"):
    A.attribute(None, None, None, "EAP", level="position")
