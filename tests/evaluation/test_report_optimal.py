"""evaluate_circuit under optimal ablation: the constants the graph was found with (saved beside it
by find_circuit, or named by meta or --optimal_values) are loaded, never trained again, and one
ablation serves every number of the report."""

import os

import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import circuits as G
from jaxinterp.attribution import optimal
from jaxinterp.evaluation import faithfulness
from jaxinterp.evaluation import report as R
from jaxinterp.groundtruth.toy import load_toy
from jaxinterp.models import edges as E
from jaxinterp.runtime import inputs

N = 8


@pytest.fixture(scope="module")
def toy():
  model = load_toy()
  cfg = model.cfg
  rng = np.random.default_rng(0)
  scores = rng.normal(size=G.Graph.from_config(cfg).scores.shape).astype(np.float32)
  values = [rng.normal(size=(E.n_senders(cfg), cfg.d_model)).astype(np.float32) for _ in range(2)]
  return model, scores, values


def _run(tmp_path, toy, meta_values=None, **config):
  """A find_circuit-like run directory (graph.json found under optimal ablation, and its learned
  constants in optimal_ablation/), evaluated by `evaluate_circuit` at the top 5 edges."""
  model, scores, values = toy
  run = tmp_path / "run"
  run.mkdir(exist_ok=True)
  graph = G.Graph.from_config(model.cfg, scores)
  graph.to_json(run / "graph.json", meta={"model": "toy", "task": "induction",
                                          "intervention": "optimal", "n_examples": N,
                                          "method": "EAP", "optimal_values": meta_values})
  optimal.save_values(str(run / optimal.RUN_DIR), values[0], {"note": "the run's"})
  cfg = R.EvaluateConfig(graph=str(run / "graph.json"), top_n=5, batch_size=N, **config)
  return R.evaluate_circuit(cfg, str(tmp_path / "evaluation"), overwrite=True)


def _empty_metric(model, values) -> float:
  ds = inputs.load_dataset(model, "toy", "induction", None, N, True, 0, False)  # as the report
  empty = G.Graph.from_config(model.cfg).empty().edge_weights()
  return faithfulness.evaluate_circuits(model.cfg, model.params, ds, empty, batch_size=N,
                                        ablation=A.Optimal(np.asarray(values)))


def test_the_runs_own_constants_are_loaded_not_trained(tmp_path, toy, monkeypatch):
  def no_training(*args, **kwargs):
    raise AssertionError("optimal-ablation constants trained again")

  monkeypatch.setattr(optimal, "learn_optimal_values", no_training)
  model, _, values = toy
  summary = _run(tmp_path, toy)
  assert summary["optimal_values"] == str(tmp_path / "run" / optimal.RUN_DIR)
  assert summary["metric_empty"] == pytest.approx(_empty_metric(model, values[0]), rel=1e-6)


def test_optimal_values_names_other_constants(tmp_path, toy, monkeypatch):
  monkeypatch.setattr(optimal, "learn_optimal_values", None)  # would fail if called
  model, _, values = toy
  other = tmp_path / "other"
  optimal.save_values(str(other), values[1], {"note": "another run's"})
  summary = _run(tmp_path, toy, optimal_values=str(other))
  assert summary["optimal_values"] == str(other)
  assert summary["metric_empty"] == pytest.approx(_empty_metric(model, values[1]), rel=1e-6)
  assert summary["metric_empty"] != pytest.approx(_empty_metric(model, values[0]), rel=1e-3)


def test_bad_optimal_values_are_one_clear_error(tmp_path, toy):
  with pytest.raises(inputs.InputError, match="--optimal_values=.*not a directory of optimal"):
    _run(tmp_path, toy, optimal_values=str(tmp_path / "absent"))
  with pytest.raises(inputs.InputError, match="--optimal_values is for --intervention=optimal"):
    _run(tmp_path, toy, optimal_values=str(tmp_path / "run" / optimal.RUN_DIR),
         intervention="patching")
  with pytest.raises(inputs.InputError, match="--graph's meta optimal_values=gone: .*not found"):
    _run(tmp_path, toy, meta_values="gone")  # the directory find_circuit loaded, since removed
  assert not os.path.exists(tmp_path / "evaluation" / "evaluation.json")
