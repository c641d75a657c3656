"""The bundled induction model: EAP-IG recovers its known circuit, and the circuit is faithful."""

import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp.circuits import Graph
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.groundtruth import toy


@pytest.fixture(scope="module")
def found():
  model = toy.load_toy()
  data = toy.induction_task_dataset(64, seed=0)
  res = A.attribute(model.cfg, model.params, data, method="EAP-IG-inputs", ig_steps=5,
                    batch_size=16, quiet=True)
  return model, data, res


def _rank(g: Graph, scores: np.ndarray, name: str) -> int:
  names = [n for n, _ in g.ranked_edges()]
  return names.index(name) + 1


def test_eap_ig_finds_the_induction_circuit(found):
  model, _, res = found
  meta = toy.toy_metadata()
  (pl, ph), (il, ih) = meta["prev_token_head"], meta["induction_head"]
  g = Graph.from_config(model.cfg, res.scores)
  k_edge = f"a{pl}.h{ph}->a{il}.h{ih}<k>"
  out_edge = f"a{il}.h{ih}->logits"
  print(f"rank of {k_edge}: {_rank(g, res.scores, k_edge)}; of {out_edge}: "
        f"{_rank(g, res.scores, out_edge)}")
  assert _rank(g, res.scores, k_edge) <= 5
  assert _rank(g, res.scores, out_edge) <= 3


def test_found_circuit_is_faithful(found):
  model, data, res = found
  curve = V.faithfulness_curve(model.cfg, model.params, data, res.scores, n_edges=[20],
                               batch_size=16, quiet=True)
  print(f"faithfulness of the top-20 circuit: {curve.faithfulness[0]:.3f}")
  assert curve.faithfulness[0] >= 0.8
