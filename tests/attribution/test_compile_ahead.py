"""`attribution.compile_ahead`: the kernel compiled in a thread is the program `attribute` runs."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks

_CFG = models.ModelConfig(family="gpt2", n_layers=2, d_model=24, n_heads=3, d_head=8, d_mlp=48,
                          d_vocab=40, n_ctx=32)


def _kernel_compiles(caplog, run) -> list[str]:
  """The log lines of XLA compiles of the EAP-IG kernel while `run()` runs."""
  caplog.clear()
  with caplog.at_level(logging.DEBUG), jax.log_compiles(True):
    run()
  return [r.getMessage() for r in caplog.records
          if "Finished XLA compilation" in r.getMessage()
          and "ig_inputs_batch" in r.getMessage()]


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_attribute_compiles_nothing_after_compile_ahead(caplog):
  method, settings = "EAP-IG-inputs", {"ig_steps": 3}
  params = models.init_params(_CFG, jax.random.PRNGKey(0))
  # Shapes used by no other test (7 rows of 5 + 5 tokens, batches of 3 with a padded last batch),
  # so that nothing is in JAX's in-memory cache before: the control below must compile.
  ds = tasks.make_induction(7, 5, _CFG.d_vocab, seed=3, bos_id=0)
  options = A.make_options(A.get_method(method), {"batch_size": 3}, **settings)
  control = ds.subset(4)  # another last-batch shape, nothing compiled ahead for it
  compiled = _kernel_compiles(
      caplog, lambda: A.attribute(_CFG, params, control, method, options, batch_size=4,
                                  quiet=True))
  assert len(compiled) == 1, compiled

  ahead = A.compile_ahead(_CFG, params, ds, method, options, batch_size=3)
  assert ahead is not None
  ahead.join()
  result = {}
  compiled = _kernel_compiles(
      caplog, lambda: result.update(r=A.attribute(_CFG, params, ds, method, options,
                                                  batch_size=3, quiet=True)))
  assert compiled == []
  scores = result["r"].scores
  assert np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_methods_without_a_compile_step_start_nothing():
  params = models.init_params(_CFG, jax.random.PRNGKey(0))
  ds = tasks.make_induction(4, 5, _CFG.d_vocab, seed=3, bos_id=0)
  options = A.make_options(A.get_method("exact"), {"batch_size": 2})
  assert A.compile_ahead(_CFG, params, ds, "exact", options, batch_size=2) is None
  options = A.make_options(A.get_method("EAP"), {"batch_size": 2})
  assert A.compile_ahead(_CFG, params, ds, "EAP", options, intervention="mean",
                         batch_size=2) is None
