"""The edge-level EAP-IG kernel on a model without block input norms (OLMo-2, `pre_norms=False`):
the identity norm's Jacobian has no x_hat term, so `receiver_grads.ig_inputs_batch` must add none
(it once did: its k/v scores, and less so its q scores, were off by up to 40% of the largest)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.circuits.layout import valid_edges
from tests.attribution.test_positions import _tiny_case


@pytest.mark.slow
def test_olmo2_kernel_matches_the_weight_gradient_definition():
  cfg, ds, batch, abl, params = _tiny_case("olmo2")
  assert not cfg.pre_norms and "ln1" not in params["blocks_0"]
  alphas = jnp.asarray(A.ig_alphas(2), jnp.float32)
  ref, _ = A.eap.weight_gradient_batch(cfg, ds.task, params, batch, abl, alphas)
  got, _, _ = RG.ig_inputs_batch(cfg, ds.task, params, batch, abl, alphas)
  valid = valid_edges(cfg)
  ref, got = np.asarray(ref)[valid], np.asarray(got)[valid]
  assert np.abs(ref).max() > 1e-2  # a real signal
  np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max(), rtol=1e-4)
