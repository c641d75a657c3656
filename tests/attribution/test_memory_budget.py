"""`--memory_budget` (IGOptions.memory_budget): EAP-IG-inputs' kernel in row and position chunks
whose planned temporaries fit the budget, with the unbudgeted scores."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import tasks
from jaxinterp.attribution import memory_budget as MB
from jaxinterp.attribution import receiver_grads as RG
from tests.attribution.test_receiver_grads import CONFIGS, _params

CFG = CONFIGS["gpt2"]
STEPS = 3


def _setup():
  params = _params(CFG)
  ds = tasks.make_induction(4, 6, CFG.d_vocab, seed=0, bos_id=0)
  return params, ds, next(ds.batches(4)), A.Ablation("patching")


def _compiled(params, ds, batch, abl, **chunks):
  alphas = jnp.asarray(A.ig_alphas(STEPS), jnp.float32)
  lowered = RG.ig_inputs_batch.lower(CFG, ds.task, params, batch, abl, alphas, **chunks)
  compiled = lowered.compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled(params, batch, abl, alphas)


def _least(params, batch) -> str:
  """The smallest budget, as the too-small error names it."""
  with pytest.raises(MB.MemoryBudgetError) as e:
    MB.row_chunks(CFG, params, batch.clean.shape, STEPS, "1kB")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("--memory_budget=1kB is below the smallest chunk")
  return re.search(r"give at least --memory_budget=(\S+)$", msg).group(1)


def test_budget_chunks_rows_lowers_the_temporaries_and_keeps_the_scores(monkeypatch):
  params, ds, batch, abl = _setup()
  b = batch.clean.shape[0]
  least = _least(params, batch)
  chunks, chunk_bytes = MB.row_chunks(CFG, params, batch.clean.shape, STEPS, least)
  assert chunks == b and chunk_bytes < RG.CHUNK_BYTES  # one row per group: more chunks
  assert MB.row_chunks(CFG, params, batch.clean.shape, STEPS, "1GB") == (1, RG.CHUNK_BYTES)
  full, ref = _compiled(params, ds, batch, abl)
  small, got = _compiled(params, ds, batch, abl, row_chunks=chunks, chunk_bytes=chunk_bytes)
  assert small < 0.6 * full, (small, full)
  # The planned temporaries bound the compiled ones (XLA:CPU), without and with the budget.
  for rows, temp, cb in ((b, full, RG.CHUNK_BYTES), (1, small, chunk_bytes)):
    planned = MB._temp_bytes(CFG, params, rows, batch.clean.shape[1], STEPS, False, cb)
    assert temp <= planned <= 2.5 * temp, (rows, temp, planned)
  ref_s, got_s = np.asarray(ref[0]), np.asarray(got[0])
  assert np.abs(ref_s).max() > 1e-2  # a real signal
  # Measured: 3e-7 of the largest score (gpt2), 7e-7 (llama-shaped): float32 sums regrouped.
  np.testing.assert_allclose(got_s, ref_s, rtol=0, atol=1e-6 * np.abs(ref_s).max())
  # Per-row metrics: the same runs on fewer rows (XLA's matmuls round per shape).
  for g, r in zip(got[1:], ref[1:], strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-6)

  seen = {}  # EAP-IG-inputs with the option runs the kernel in those chunks

  def kernel(*args, **kw):
    seen.update(kw)
    return got

  monkeypatch.setattr(RG, "ig_inputs_batch", kernel)
  opts = A.IGOptions(ig_steps=STEPS, memory_budget=least)
  out = A.eap.score_eap_ig_inputs(CFG, ds.task, params, batch, abl, opts)
  assert (seen["row_chunks"], seen["chunk_bytes"]) == (chunks, chunk_bytes)
  np.testing.assert_array_equal(out.scores, got_s)


def test_budget_below_one_row_is_one_line():
  params, _, batch, _ = _setup()
  least = _least(params, batch)
  below = f"{float(least[:-2]) * 0.98:.3g}{least[-2:]}"
  with pytest.raises(MB.MemoryBudgetError, match=rf"^--memory_budget={re.escape(below)} is below"):
    MB.row_chunks(CFG, params, batch.clean.shape, STEPS, below)
  with pytest.raises(A.AttributionError, match=r"^--memory_budget=2XB: expected a positive size"):
    A.IGOptions(memory_budget="2XB")


def test_budget_is_refused_where_no_kernel_chunks():
  with pytest.raises(A.AttributionError, match="^--memory_budget is for --level=edge only, not "
                     "--level=node$"):
    A.IGOptions(memory_budget="1GB", level="node")
  params, ds, batch, abl = _setup()
  opts = A.IGOptions(ig_steps=STEPS, memory_budget="1GB")
  with pytest.raises(A.AttributionError, match="^--memory_budget is for EAP-IG-inputs only"):
    A.ig_activations.score_batch(CFG, ds.task, params, batch, abl, opts)


def test_default_is_the_unchunked_kernel():
  """No budget: the same program as before (one group, CHUNK_BYTES contraction chunks)."""
  params, ds, batch, abl = _setup()
  alphas = jnp.asarray(A.ig_alphas(STEPS), jnp.float32)
  a = RG.ig_inputs_batch.lower(CFG, ds.task, params, batch, abl, alphas).as_text()
  b = jax.jit(lambda p: RG._ig_inputs(CFG, ds.task, p, batch, abl, alphas, False, None,
                                      RG.CHUNK_BYTES)).lower(params).as_text()
  assert "while" in a and a.count("stablehlo.while") == b.count("stablehlo.while")
