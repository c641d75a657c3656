"""`--memory_budget` (IGOptions.memory_budget): the receiver-gradient kernel (EAP-IG-inputs' and
EAP-IG-activations') in row and position chunks whose planned temporaries fit the budget, with the
unbudgeted scores."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import contraction as C
from jaxinterp.attribution import ig_activations as IA
from jaxinterp.attribution import memory_budget as MB
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.runtime import sizes
from tests.attribution.test_receiver_grads import CONFIGS, _params

CFG = CONFIGS["gpt2"]
STEPS = 3


def _setup():
  params = _params(CFG)
  ds = tasks.make_induction(4, 6, CFG.d_vocab, seed=0, bos_id=0)
  return params, ds, next(ds.batches(4)), A.Patching()


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


@pytest.mark.slow  # the fast suite's CPU budget (10 min); CI runs it with the slow tests
def test_budget_chunks_rows_lowers_the_temporaries_and_keeps_the_scores(monkeypatch):
  params, ds, batch, abl = _setup()
  b = batch.clean.shape[0]
  least = _least(params, batch)
  chunks, chunk_bytes = MB.row_chunks(CFG, params, batch.clean.shape, STEPS, least)
  assert chunks == b and chunk_bytes < C.CHUNK_BYTES  # one row per group: more chunks
  assert MB.row_chunks(CFG, params, batch.clean.shape, STEPS, "1GB") == (1, C.CHUNK_BYTES)
  full, ref = _compiled(params, ds, batch, abl)
  small, got = _compiled(params, ds, batch, abl, row_chunks=chunks, chunk_bytes=chunk_bytes)
  assert small < 0.6 * full, (small, full)
  # The planned temporaries bound the compiled ones (XLA:CPU), without and with the budget.
  for rows, temp, cb in ((b, full, C.CHUNK_BYTES), (1, small, chunk_bytes)):
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


def test_default_is_the_unchunked_kernel():
  """No budget: the same program as before (one group, CHUNK_BYTES contraction chunks)."""
  params, ds, batch, abl = _setup()
  alphas = jnp.asarray(A.ig_alphas(STEPS), jnp.float32)
  a = RG.ig_inputs_batch.lower(CFG, ds.task, params, batch, abl, alphas).as_text()
  b = jax.jit(lambda p: RG._ig_inputs(CFG, ds.task, p, batch, abl, alphas, False, None,
                                      C.CHUNK_BYTES)).lower(params).as_text()
  assert "while" in a and a.count("stablehlo.while") == b.count("stablehlo.while")


def _activations_compiled(cfg, params, ds, batch, abl, remat, **chunks):
  alphas = jnp.asarray(A.ig_alphas(STEPS, eap_start=1), jnp.float32)
  compiled = RG.ig_inputs_batch.lower(cfg, ds.task, params, batch, abl, alphas, remat=remat,
                                      interpolate="activations", **chunks).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled(params, batch, abl, alphas)


def _activations_chunks(cfg, params, shape, budget, remat=False):
  return MB.row_chunks(cfg, params, shape, STEPS, budget, remat, interpolate="activations")


def _check_activations_budget(family, remat, monkeypatch):
  """EAP-IG-activations under the least budget the too-small error names: one row per group, the
  compiled temporaries under that budget (and the unbudgeted ones over it), the planned ones an
  upper bound within 2x, the scores those of the unchunked kernel to float rounding."""
  cfg = CONFIGS[family]
  params, ds, batch, abl = _setup()
  if family != "gpt2":
    params = _params(cfg)
  b, p = batch.clean.shape
  with pytest.raises(MB.MemoryBudgetError) as e:
    _activations_chunks(cfg, params, (b, p), "1kB", remat)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("--memory_budget=1kB is below the smallest chunk: "
                                            f"one row of {p} positions needs ")
  least = re.search(r"give at least --memory_budget=(\S+)$", msg).group(1)
  below = f"{float(least[:-2]) * 0.98:.3g}{least[-2:]}"
  with pytest.raises(MB.MemoryBudgetError, match=rf"^--memory_budget={re.escape(below)} is below"):
    _activations_chunks(cfg, params, (b, p), below, remat)
  chunks, chunk_bytes = _activations_chunks(cfg, params, (b, p), least, remat)
  assert chunks == b
  assert _activations_chunks(cfg, params, (b, p), "1GB", remat) == (1, C.CHUNK_BYTES)
  full, ref = _activations_compiled(cfg, params, ds, batch, abl, remat)
  small, got = _activations_compiled(cfg, params, ds, batch, abl, remat, row_chunks=chunks,
                                     chunk_bytes=chunk_bytes)
  assert small <= sizes.parse_bytes(least, "memory_budget") < full, (small, least, full)
  for rows, temp, cb in ((b, full, C.CHUNK_BYTES), (1, small, chunk_bytes)):
    planned = MB._temp_bytes(cfg, params, rows, p, STEPS, remat, cb, "activations")
    assert temp <= planned <= 2 * temp, (rows, temp, planned)
  ref_s, got_s = np.asarray(ref[0]), np.asarray(got[0])
  assert np.abs(ref_s).max() > 1e-2  # a real signal
  # Measured: 2.4e-6 of the largest score (Llama-shaped): float32 sums regrouped (each group of
  # rows sums its steps and contracts in its own position chunks, then the groups are summed).
  np.testing.assert_allclose(got_s, ref_s, rtol=0, atol=4e-6 * np.abs(ref_s).max())
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-6)  # per-row metrics, at the last step

  seen = {}  # EAP-IG-activations with the option runs its kernel in those groups

  def kernel(*args, **kw):
    seen.update(kw)
    return got

  monkeypatch.setattr(RG, "ig_inputs_batch", kernel)
  opts = A.IGOptions(ig_steps=STEPS, memory_budget=least, remat=remat)
  out = IA.score_batch(cfg, ds.task, params, batch, abl, opts)
  assert seen == {"remat": remat, "suffix": None, "interpolate": "activations",
                  "row_chunks": chunks, "chunk_bytes": chunk_bytes}
  np.testing.assert_array_equal(out.scores, got_s)


@pytest.mark.slow  # EAP-IG-activations under a budget (about 5 s); its plan is tested fast
def test_activations_budget_chunks_rows_under_the_budget(monkeypatch):
  _check_activations_budget("gpt2", False, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("family,remat", [("llama", False), ("gpt2", True)])
def test_activations_budget_other_shapes(family, remat, monkeypatch):
  _check_activations_budget(family, remat, monkeypatch)


# Four layers: there a rematerialised row's planned temporaries are below an unrematerialised one's
# (one block's activations kept in the backward, not every layer's).
DEEP = dataclasses.replace(CFG, n_layers=4)


def _shapes(cfg):
  """The parameters' shapes (all a plan reads: the blocks' sizes), without initialising them."""
  return jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))


def _leasts(plan, shape) -> tuple[float, float]:
  """The least budgets of one row (bytes, planned) without and with remat."""
  out = []
  for remat in (False, True):
    with pytest.raises(MB.MemoryBudgetError) as e:
      plan(DEEP, _shapes(DEEP), shape, STEPS, "1kB", remat)
    out.append(e.value.least)
  return out[0], out[1]


@pytest.mark.parametrize("kind", ["inputs", "activations"])
def test_budget_turns_remat_on_where_only_a_rematted_row_fits(kind):
  """Between the two least budgets the plan runs remat (and says so); below remat's least, one
  line names it; --remat given is kept; a roomy budget leaves remat off."""
  shape = (4, 16)

  def chunks_of(*a):
    return MB.row_chunks(*a, interpolate=kind)

  def plan_of(*a, **k):
    return MB.inputs_plan(*a, **k, interpolate=kind)
  params = _shapes(DEEP)
  plain, rematted = _leasts(chunks_of, shape)
  assert rematted < 0.97 * plain, (rematted, plain)
  between = sizes.fmt_bytes((plain + rematted) / 2).replace(" ", "")
  plan = plan_of(DEEP, params, shape, STEPS, between)
  assert (plan.remat, plan.auto_remat, plan.row_chunks) == (True, True, 4)
  assert plan.note("M", between) == (
      f"note: --memory_budget={between}: one row of the batch fits only rematerialised, so M "
      "runs with --remat (same scores to float rounding, more compute)")
  explicit = plan_of(DEEP, params, shape, STEPS, between, remat=True)
  assert (explicit.remat, explicit.auto_remat, explicit.note("M", between)) == (True, False, None)
  roomy = plan_of(DEEP, params, shape, STEPS, "1GB")
  assert (roomy.remat, roomy.auto_remat, roomy.row_chunks) == (False, False, 1)
  below = sizes.fmt_bytes(0.98 * rematted).replace(" ", "")
  with pytest.raises(MB.MemoryBudgetError) as e:
    plan_of(DEEP, params, shape, STEPS, below)
  msg = str(e.value)
  least = sizes.round_up(rematted)
  assert msg == (f"--memory_budget={below} is below the smallest chunk: one row of {shape[1]} "
                 f"positions needs {least} of temporaries (planned, rematerialised); give at "
                 f"least --memory_budget={least}")
  assert sizes.parse_bytes(least, "m") < plain  # the remat'd least, not the plain one


def test_eap_ig_inputs_runs_the_rematted_kernel_and_notes_it_once(monkeypatch, capsys):
  """EAP-IG-inputs under such a budget calls the kernel with remat (no shared-prefix suffix, which
  the remat kernel does not take) and prints one note line, once per run; `start_run` begins the
  next run's record."""
  params = _shapes(DEEP)
  ds = tasks.make_induction(4, 6, DEEP.d_vocab, seed=0, bos_id=0)
  batch, abl = next(ds.batches(4)), A.Patching()
  plain, rematted = _leasts(MB.row_chunks, batch.clean.shape)
  between = sizes.fmt_bytes((plain + rematted) / 2).replace(" ", "")
  seen = []
  zeros = jnp.zeros(batch.clean.shape[:1])

  def kernel(*args, **kw):
    seen.append(kw)
    return jnp.zeros((8, 8)), zeros, zeros

  monkeypatch.setattr(RG, "ig_inputs_batch", kernel)
  monkeypatch.setattr(MB, "_NOTED", set())
  assert not MB.remat_chosen()
  opts = A.IGOptions(ig_steps=STEPS, memory_budget=between)
  for _ in range(2):
    A.eap.score_eap_ig_inputs(DEEP, ds.task, params, batch, abl, opts)
  assert [(k["remat"], k["suffix"], k["row_chunks"]) for k in seen] == [(True, None, 4)] * 2
  assert MB.remat_chosen()
  err = capsys.readouterr().err.splitlines()
  assert err == [f"note: --memory_budget={between}: one row of the batch fits only "
                 "rematerialised, so EAP-IG-inputs runs with --remat (same scores to float "
                 "rounding, more compute)"]
  MB.start_run()
  assert not MB.remat_chosen()


@pytest.mark.slow  # three compiles of the 4-layer kernels (a few tens of seconds)
@pytest.mark.by_hand  # CI's 30 minutes
def test_auto_remat_scores_equal_the_unbudgeted_ones():
  """The auto-remat'd kernel (the per-head-input kernel, interpolating the inputs or the layers'
  activations) gives the unbudgeted scores to float rounding, its compiled temporaries in
  budget."""
  params = _params(DEEP)
  ds = tasks.make_induction(4, 6, DEEP.d_vocab, seed=0, bos_id=0)
  batch, abl = next(ds.batches(4)), A.Patching()
  b, p = batch.clean.shape
  plain, rematted = _leasts(MB.row_chunks, (b, p))
  between = sizes.fmt_bytes((plain + rematted) / 2).replace(" ", "")
  plan = MB.inputs_plan(DEEP, params, (b, p), STEPS, between)
  alphas = jnp.asarray(A.ig_alphas(STEPS), jnp.float32)
  ref = RG.ig_inputs_batch(DEEP, ds.task, params, batch, abl, alphas)
  low = RG.ig_inputs_batch.lower(DEEP, ds.task, params, batch, abl, alphas, remat=True,
                                 row_chunks=plan.row_chunks, chunk_bytes=plan.chunk_bytes)
  compiled = low.compile()
  assert compiled.memory_analysis().temp_size_in_bytes <= sizes.parse_bytes(between, "m")
  got = compiled(params, batch, abl, alphas)
  ref_s, got_s = np.asarray(ref[0]), np.asarray(got[0])
  assert np.abs(ref_s).max() > 1e-2
  # A different kernel (per-head-input gradients contracted once, not the fused contraction) and
  # regrouped sums: equal to float rounding, not bitwise.
  np.testing.assert_allclose(got_s, ref_s, rtol=0, atol=2e-6 * np.abs(ref_s).max())

  def activations(*a, **k):
    return MB.row_chunks(*a, **k, interpolate="activations")

  aplain, arem = _leasts(activations, (b, p))
  assert arem < aplain
  abetween = sizes.fmt_bytes((aplain + arem) / 2).replace(" ", "")
  aplan = MB.inputs_plan(DEEP, params, (b, p), STEPS, abetween, interpolate="activations")
  assert aplan.auto_remat
  al = jnp.asarray(A.ig_alphas(STEPS, eap_start=1), jnp.float32)
  aref = RG.ig_inputs_batch(DEEP, ds.task, params, batch, abl, al, interpolate="activations")
  agot = RG.ig_inputs_batch(DEEP, ds.task, params, batch, abl, al, remat=True,
                            row_chunks=aplan.row_chunks, chunk_bytes=aplan.chunk_bytes,
                            interpolate="activations")
  np.testing.assert_allclose(np.asarray(agot[0]), np.asarray(aref[0]), rtol=0,
                             atol=2e-6 * np.abs(np.asarray(aref[0])).max())


def test_row_groups_hold_each_devices_own_rows():
  """`contraction.group_rows` on rows split over 2 devices in blocks of 6: each of the 3 groups
  takes 2 rows of every block, and `ungroup_rows` puts per-row values back in batch order; with
  one shard, the groups are consecutive rows."""
  rows = np.arange(12)
  groups = np.asarray(C.group_rows(jnp.asarray(rows), 3, 2))
  np.testing.assert_array_equal(groups, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]])
  np.testing.assert_array_equal(C.ungroup_rows(jnp.asarray(groups), 2), rows)
  np.testing.assert_array_equal(C.group_rows(jnp.asarray(rows), 3), rows.reshape(3, 4))
  np.testing.assert_array_equal(C.ungroup_rows(jnp.asarray(rows.reshape(3, 4))), rows)
  # the plan counts the rows a device holds: 8 rows on 4 devices hold 2 each, so 1 or 2 groups
  fits = lambda rows, total: rows <= 1  # noqa: E731
  assert MB._fewest_groups(8, 16, "1GB", 1e9, fits, data_shards=4) == 2
  assert MB._fewest_groups(8, 16, "1GB", 1e9, fits) == 8


_DATA_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jaxinterp import attribution as A, tasks
from jaxinterp.attribution import contraction as C, receiver_grads as RG
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import init_params
from jaxinterp.runtime import memory_plan as MP, memory_programs as PR, sharding

assert jax.device_count() == 4, jax.devices()
cfg = ModelConfig(family="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16,
                  d_mlp=128, d_vocab=50, n_ctx=32, normalization="rmsnorm", positional="rotary",
                  rotary_dim=16, gated_mlp=True, mlp_bias=False, act_fn="silu", attn_bias=False,
                  attn_out_bias=False, tied_embeddings=False)
mesh = MP.parse_mesh("4x1")
alphas = jnp.asarray(A.ig_alphas(3), jnp.float32)
kernels = {
    "inputs": lambda p, x, a, **k: RG.ig_inputs_batch(cfg, x.task, p, x.batch, a, alphas, **k),
    "activations": lambda p, x, a, **k: RG.ig_inputs_batch(cfg, x.task, p, x.batch, a, alphas,
                                                           interpolate="activations", **k)}
ds = tasks.make_induction(8, 6, cfg.d_vocab, seed=0, bos_id=0)
batch, abl = next(ds.batches(8)), A.Patching()
p = init_params(cfg, jax.random.PRNGKey(0))
sb, sp = sharding.shard_batch(batch, mesh), sharding.shard_params(p, mesh)
assert C.data_shards_of(sb.clean) == 4
params = MP.abstract_params(cfg, jnp.float32, mesh)
for name, kernel in kernels.items():
  temps = {}
  for label, chunks in [("whole", {}), ("grouped as one device", dict(row_chunks=2)),
                        ("grouped per device", dict(row_chunks=2, data_shards=4))]:
    fn = lambda p, b, kernel=kernel, chunks=chunks: kernel(
        p, type("X", (), dict(task=PR.TASK, batch=b)), PR.PATCHING, **chunks)
    c = jax.jit(fn).lower(params, MP.abstract_batch(8, 16, mesh)).compile()
    temps[label] = c.memory_analysis().temp_size_in_bytes
    gathers = c.as_text().count("all-gather(")
    # the batch-order groups span the devices: XLA gathers the rows; the per-device ones do not
    assert (gathers > 0) == (label == "grouped as one device"), (name, label, gathers)
  assert temps["grouped per device"] < 0.8 * temps["whole"], (name, temps)
  x = type("X", (), dict(task=ds.task, batch=batch))
  ref = kernel(p, x, abl, row_chunks=2)
  got = kernel(sp, type("X", (), dict(task=ds.task, batch=sb)), abl, row_chunks=2, data_shards=4)
  ref0, got0 = np.asarray(ref[0]), np.asarray(got[0])
  assert np.abs(ref0).max() > 1e-3
  np.testing.assert_allclose(got0, ref0, rtol=0, atol=1e-6 * np.abs(ref0).max())
  for r, g in zip(ref[1:], got[1:]):  # per-row values, in batch order
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-6)
  print(name, temps)
print("ok")
"""


@pytest.mark.slow  # a fresh process on 4 simulated devices: 6 compiles and 4 runs (~70 s of CPU)
@pytest.mark.by_hand  # CI's 30 minutes; the grouping itself is tested fast above
def test_budget_row_groups_on_a_data_mesh_stay_on_each_device():
  """With the rows split over a mesh's "data" axis, `--memory_budget`'s groups take each device's
  own rows (`contraction.group_rows`): no all-gather (groups of consecutive rows made XLA gather
  them), the temporaries fall as on one device, and the scores and per-row values are the
  single-device grouped ones to float rounding."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, "-c", _DATA_MESH], env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.rstrip().endswith("ok"), out.stdout
