"""bf16 params give scores that correlate with fp32; rematerialisation does not change scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.circuits.layout import valid_edges

CFG = models.ModelConfig(family="gpt2", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64,
                         d_vocab=50, n_ctx=32)
# Weights scaled up from the 0.02 init so that the scores carry signal well above rounding noise.
PARAMS = jax.tree.map(lambda x: x * 5 if x.ndim >= 2 else x,
                      models.init_params(CFG, jax.random.PRNGKey(3)))
DATA = tasks.make_induction(8, 5, 50, seed=1, bos_id=0)


@pytest.mark.slow
def test_bf16_scores_correlate_with_fp32():
  valid = valid_edges(CFG)
  f32 = A.attribute(CFG, PARAMS, DATA, method="EAP-IG-inputs", batch_size=8, quiet=True).scores
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
  b16 = A.attribute(CFG, p16, DATA, method="EAP-IG-inputs", batch_size=8, quiet=True).scores
  a, b = f32[valid].astype(np.float64), b16[valid].astype(np.float64)
  assert np.abs(a).max() > 1e-2
  assert not np.array_equal(a, b)  # bf16 really changed the arithmetic
  assert np.corrcoef(a, b)[0, 1] >= 0.99


@pytest.mark.slow
def test_remat_does_not_change_scores():
  for method in ("EAP-IG-inputs", "EAP-IG-activations"):
    a = A.attribute(CFG, PARAMS, DATA, method=method, batch_size=8, quiet=True).scores
    b = A.attribute(CFG, PARAMS, DATA, method=method, batch_size=8, quiet=True, remat=True).scores
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
