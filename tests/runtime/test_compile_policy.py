"""jaxinterp.runtime.compile_policy: small models compile with XLA:CPU's lighter optimisation, to
the same numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp.attribution import receiver_grads
from jaxinterp.runtime import compile_policy as P
from jaxinterp.runtime import inputs, shared_prefix


def _toy():
  model = inputs.load_model(inputs.TOY)
  ds = inputs.load_dataset(model, inputs.TOY, "induction", None, 8, True, 0)
  return model, ds


def test_small_models_compile_fast_large_ones_fully(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv(P.ENV, raising=False)
  cfg = inputs.load_model(inputs.TOY).cfg
  assert P.compiler_options(cfg) is None  # opt-in: fully optimised by default
  monkeypatch.setenv(P.ENV, "fast")
  assert P.n_params(cfg) < P.SMALL_MODEL_PARAMS
  assert P.compiler_options(cfg) == P.FAST_COMPILE
  big = dataclasses.replace(cfg, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_layers=12)
  assert P.n_params(big) > P.SMALL_MODEL_PARAMS
  assert P.compiler_options(big) is None
  assert P.compiler_options(None) is None
  monkeypatch.setenv(P.ENV, "full")
  assert P.compiler_options(cfg) is None
  monkeypatch.setenv(P.ENV, "fast")
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # the user's flag wins
  assert P.compiler_options(cfg) is None


def test_jit_picks_the_program_by_config(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  cfg = inputs.load_model(inputs.TOY).cfg

  @P.jit(static_argnames=("cfg",))
  def f(cfg, x):
    return x * cfg.d_model

  x = jnp.arange(3.0)
  monkeypatch.setenv(P.ENV, "fast")
  assert f._pick((cfg, x), {}) is f._fast
  assert f._pick((), {"cfg": cfg, "x": x}) is f._fast
  monkeypatch.setenv(P.ENV, "full")
  assert f._pick((cfg, x), {}) is f._full
  np.testing.assert_array_equal(f(cfg, x), x * cfg.d_model)
  assert f.__name__ == "f"


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_fast_compile_gives_the_eap_ig_kernel_bitwise_equal_scores():
  """The toy's EAP-IG-inputs kernel compiled with FAST_COMPILE and with XLA's default optimisation
  (level 2, fusion emitters on), set explicitly so the suite's own XLA_FLAGS do not matter."""
  model, ds = _toy()
  cfg, params = model.cfg, model.params
  batch = next(iter(ds.batches(len(ds))))
  abl = A.make_ablation(cfg, params, ds, "patching", len(ds))
  alphas = jnp.asarray(A.ig_alphas(5), jnp.float32)
  lowered = receiver_grads.ig_inputs_batch.lower(
      cfg, ds.task, params, batch, abl, alphas, suffix=shared_prefix.plan(cfg, batch, abl.kind))
  full = lowered.compile({"xla_backend_optimization_level": 2,
                          "xla_cpu_use_fusion_emitters": True})
  fast = lowered.compile(P.FAST_COMPILE)
  for a, b in zip(jax.tree.leaves(full(params, batch, abl, alphas)),
                  jax.tree.leaves(fast(params, batch, abl, alphas)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
