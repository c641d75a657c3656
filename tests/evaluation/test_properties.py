"""Property tests of graph algebra under evaluation: faithfulness of the full graph is 1, of the
empty graph 0, for any scores, data seed and ablation."""

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxinterp import models, tasks
from jaxinterp.circuits import Graph
from jaxinterp.evaluation import faithfulness as V

CFG = models.ModelConfig(family="gpt2", d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32,
                         d_vocab=40, n_ctx=32)
PARAMS = models.init_params(CFG, jax.random.PRNGKey(3))
N_EDGES = Graph.from_config(CFG).n_edges


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10**6), intervention=st.sampled_from(["patching", "zero", "mean"]),
       absolute=st.booleans())
def test_faithfulness_of_full_is_one_and_empty_is_zero(seed, intervention, absolute):
  data = tasks.make_induction(4, 4, 40, seed=seed, bos_id=0)
  scores = np.random.default_rng(seed).normal(size=Graph.from_config(CFG).valid.shape)
  curve = V.faithfulness_curve(CFG, PARAMS, data, scores.astype(np.float32),
                               n_edges=[0, N_EDGES], absolute=absolute,
                               intervention=intervention, batch_size=4, quiet=True)
  np.testing.assert_allclose(curve.faithfulness, [0.0, 1.0], atol=1e-4)
