"""UGS's defaults: MIB's lambda scaled by the graph's size, and the bundled model's circuit found
with them (issue 28)."""

import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models
from jaxinterp.attribution import ugs
from jaxinterp.circuits import Graph
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.groundtruth import toy

KNOWN = ("a0.h3->a1.h0<k>", "a1.h0->logits")


def test_default_lambda_is_mibs_scaled_by_the_graph_and_given_values_are_kept():
  gpt2 = models.ModelConfig(family="gpt2", d_model=768, n_layers=12, n_heads=12, d_head=64,
                            d_mlp=3072, d_vocab=50257, n_ctx=1024)
  assert valid_edges(gpt2).sum() == ugs.GPT2_SMALL_EDGES
  assert ugs.penalties(gpt2, ugs.UGSOptions()) == pytest.approx((1e-3, 2e-4))
  cfg = toy.load_toy().cfg
  k = 2 * ugs.GPT2_SMALL_EDGES / 110
  assert valid_edges(cfg).sum() == 110 and ugs.graph_scale(cfg) == pytest.approx(k)
  assert ugs.penalties(cfg, ugs.UGSOptions()) == pytest.approx((1e-3 * k, 2e-4))
  # explicit values are used as given (the reference's node penalty from a given lambda)
  assert ugs.penalties(cfg, ugs.UGSOptions(reg_lamb=1e-3)) == (1e-3, 2e-4)
  assert ugs.penalties(cfg, ugs.UGSOptions(reg_lamb=0.1, node_reg=0.0)) == (0.1, 0.0)
  assert ugs.default_lr(None, "patching") == ugs.default_lr(1e-3, "patching") == 0.01
  with pytest.raises(A.AttributionError, match="reg_lamb"):
    ugs.UGSOptions(reg_lamb=-1.0)


@pytest.mark.slow
def test_defaults_find_the_bundled_models_circuit():
  """`find_circuit --method=UGS` with its default flags (64 examples, patching, UGSOptions())."""
  model = toy.load_toy()
  data = toy.induction_task_dataset(64)
  res = A.attribute(model.cfg, model.params, data, method="UGS", quiet=True)
  names = [n for n, _ in Graph.from_config(model.cfg, res.scores).ranked_edges()]
  ranks = [names.index(e) for e in KNOWN]
  assert max(ranks) < 5, (ranks, names[:8], np.sort(res.scores.ravel())[::-1][:8])
