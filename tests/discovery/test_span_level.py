"""find_circuit --level=position --schema=...: the span-level outputs and their names, the
binary end to end on the bundled model; each bad --schema / --span_aggregation setting is refused in
one line, before any output."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

from jaxinterp.circuits import schemas as S
from jaxinterp.circuits import span_circuits as SC
from jaxinterp.discovery import FindCircuitConfig, find_circuit
from jaxinterp.runtime import inputs
from jaxinterp.viz import span_plot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**extra):
  return FindCircuitConfig(**dict(dict(model="toy", method="EAP-IG-inputs", n_examples=4,
                                       batch_size=4, top_n=12, schema="induction",
                                       options={"level": "position"}), **extra))


@pytest.mark.parametrize("extra, message", [
    (dict(options={}), "--schema groups position edges into spans: it needs --level=position, "
                       "not edge"),
    (dict(options={"level": "node"}), "--schema groups position edges into spans: it needs "
                                    "--level=position, not node"),
    (dict(schema="greater_than"), "--schema=greater_than: unknown schema; choose from induction, "
                                  "ioi"),
    (dict(span_aggregation="median"), "--span_aggregation=median: choose from sum, mean, max_abs"),
    (dict(schema=None, span_aggregation="mean"), "--span_aggregation aggregates position scores "
                                                 "over --schema's spans; give --schema"),
    (dict(schema="ioi"), "--schema=ioi: row 0: the subject name (token "),
])
def test_refusals_are_one_line(tmp_path, extra, message):
  out = str(tmp_path / "x")
  with pytest.raises(inputs.InputError) as e:
    find_circuit(_config(**extra), out)
  assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
  assert not os.path.exists(out)


@pytest.mark.slow
def test_binary_span_level_run(tmp_path):
  out = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  args = [sys.executable, "-m", "experiments.find_circuit", "--level=position", "--n_examples=8",
          "--batch_size=8", "--top_n=12", "--schema=induction", "--span_aggregation=sum"]
  r = subprocess.run(args + [f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "circuit: top 12 span edges; faithfulness" in r.stdout
  assert "a0.h3@after_first_A->a1.h0<k>@last" in r.stdout  # the K-composition span edge
  assert sorted(os.listdir(out)) == ["DONE", "circuit.png", "faithfulness.csv", "faithfulness.png",
                                     "graph.json", "run.json", "spans.npz"]
  d = json.loads((out / "graph.json").read_text())
  assert d["format"] == "jaxinterp-span-scores" and d["score_convention"] == "loss"
  assert d["meta"]["schema"] == "induction" and d["meta"]["span_aggregation"] == "sum"
  assert d["meta"]["level"] == "position" and d["meta"]["top_n"] == 12
  assert d["spans"] == list(S.induction_schema().names)
  every = SC.from_npz(out / "spans.npz")  # graph.json's circuit = spans.npz's top 12, by |score|
  chosen = SC.select(every, 12)
  assert list(d["edges"]) == [S.span_edge_name(every.layout, every.names, *e[:4])
                              for e in chosen]
  back = SC.from_json(out / "graph.json")
  assert [e[:4] for e in SC.select(back, 12)] == [e[:4] for e in chosen]
  # circuit.png draws the circuit's edges (all 12: under the limit), one column per span.
  assert (out / "circuit.png").stat().st_size > 20_000
  assert mpimg.imread(out / "circuit.png").shape[1] > 800
  drawn = span_plot.plot_span_circuit(every, chosen, str(tmp_path / "again.png"))
  assert [S.span_edge_name(every.layout, every.names, *e[:4]) for e in drawn] == list(d["edges"])
  assert len(drawn) == 12 < span_plot.MAX_DRAWN_SPAN_EDGES
  with open(out / "faithfulness.csv") as f:
    rows = list(csv.DictReader(f))
  n_total = SC.n_edges(every)
  assert int(rows[-1]["n_edges"]) == n_total == d["meta"]["n_span_edges"]
  assert float(rows[-1]["faithfulness"]) == 1.0 and float(rows[0]["faithfulness"]) == 0.0
  f12 = [float(x["faithfulness"]) for x in rows if x["n_edges"] == "12"][0]
  assert np.isclose(f12, d["meta"]["faithfulness"]) and 0.2 < f12 <= 1.2
  # The same run again is complete; a bad --schema through the binary is one line, no output.
  r = subprocess.run(args + [f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 0 and "complete" in r.stdout + r.stderr
  bad = tmp_path / "bad"
  r = subprocess.run(args[:-2] + ["--schema=nope", f"--out={bad}"], cwd=ROOT, env=env,
                     capture_output=True, text=True)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert r.stderr.strip().count("\n") == 0 and "--schema=nope: unknown schema" in r.stderr
  assert not bad.exists()
