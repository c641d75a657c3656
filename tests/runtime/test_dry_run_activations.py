"""EAP-IG-activations' memory plan (`--dry_run`): the plan lowers the kernel the run executes.

The run's program is caught as `ig_activations.score_batch` calls it on real weights and a real
batch (`receiver_grads.ig_inputs_batch(..., interpolate="activations")`, with the run's alphas,
remat and `--memory_budget` row groups);
XLA's figures of that compiled program (`memory_analysis`) are the measured ones the plan, compiled
on abstract arrays, must be within 25% of.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import attribution as A
from jaxinterp.attribution import ig_activations as IA
from jaxinterp.attribution import memory_budget as MB
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.attribution.ablation import Patching
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import init_params
from jaxinterp.runtime import memory_plan as MP
from jaxinterp.runtime import memory_programs as PR
from jaxinterp.runtime import sizes

_GPT2 = dict(family="gpt2", d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=50,
             n_ctx=32)
_B, _P, _STEPS = 4, 16, 3


def _real_batch(b: int, p: int):
  """A batch of `abstract_batch`'s shapes filled with token ids (every row real, full length)."""
  rng = np.random.default_rng(0)
  abstract = MP.abstract_batch(b, p)
  batch = jax.tree.map(lambda s: jnp.asarray(rng.integers(0, 50, s.shape), s.dtype), abstract)
  return batch.replace(mask=jnp.ones((b, p), bool), last=jnp.full((b,), p - 1, jnp.int32),
                       valid=jnp.ones((b,), bool))


def _run_program(cfg, options, monkeypatch) -> tuple[MP.Compiled, dict]:
  """XLA's figures of the program `score_batch` runs (and its static arguments)."""
  caught = []
  kernel = RG.ig_inputs_batch

  def spy(*args, **kw):
    caught.append((args, kw))
    return kernel(*args, **kw)

  monkeypatch.setattr(RG, "ig_inputs_batch", spy)
  params = init_params(cfg, jax.random.PRNGKey(0))
  out = IA.score_batch(cfg, PR.TASK, params, _real_batch(_B, _P), Patching(), options)
  monkeypatch.undo()
  assert np.isfinite(np.asarray(out.scores)).all()
  (args, kw), = caught
  m = kernel.lower(*args, **kw).compile().memory_analysis()
  return MP.Compiled(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                     int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)), kw


def _least_budget(cfg) -> str:
  """The least `--memory_budget` of one row per group (the planned temporaries of one row)."""
  params = MP.abstract_params(cfg, jnp.float32)
  return sizes.round_up(MB._temp_bytes(cfg, params, 1, _P, _STEPS, False,
                                       MB.row_chunks(cfg, params, (1, _P), _STEPS, "1GB")[1],
                                       "activations"))


@pytest.mark.parametrize("budgeted", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_activations_plan_within_25_percent_of_the_run_program(budgeted, monkeypatch):
  cfg = ModelConfig(**_GPT2)
  budget = _least_budget(cfg) if budgeted else None
  method = A.get_method("EAP-IG-activations")
  options = A.make_options(method, None, ig_steps=_STEPS, memory_budget=budget)
  measured, kw = _run_program(cfg, options, monkeypatch)
  assert kw.get("row_chunks", 1) == (_B if budgeted else 1)  # one row per group at the least budget

  params = MP.abstract_params(cfg, jnp.float32)
  alphas = options.alphas(eap_start=1)
  build = PR.eap(cfg, params, _P, alphas, memory_budget=budget, remat=options.remat,
                 interpolate="activations")
  fn, args = build(_B)
  planned = MP.compile_memory(fn, *args)  # make_plan's figure at --batch_size
  # the same arguments but the alphas (the run's, the plan's constants): params, batch
  assert abs(planned.argument - measured.argument) <= 4 * len(alphas)
  for field in ("temp", "output", "argument", "peak"):
    got, want = getattr(planned, field), getattr(measured, field)
    assert abs(got - want) <= 0.25 * want, (field, planned, measured)
  notes = PR.eap_notes(cfg, params, _P, len(alphas), _B, budget, options.remat,
                       "EAP-IG-activations", interpolate="activations")
  assert notes[0].startswith(f"EAP-IG-activations: 5 layer nodes x {_STEPS} steps")
  if budgeted:
    assert f"{_B} group(s) at batch {_B}, {2 * _B} at {2 * _B}" in notes[1]


def test_activations_plan_budget_below_one_row_is_one_line():
  cfg = ModelConfig(**_GPT2)
  build = PR.eap(cfg, MP.abstract_params(cfg, jnp.float32), _P, [0.5, 1.0],
                 memory_budget="1kB", interpolate="activations")
  with pytest.raises(MB.MemoryBudgetError, match="^--memory_budget=1kB is below the smallest "
                     "chunk: one row of 16 positions needs .* give at least") as e:
    build(_B)
  assert "\n" not in str(e.value)


@pytest.mark.slow  # the binary in a subprocess: imports and two compiles of the toy kernel
def test_find_circuit_dry_run_plans_eap_ig_activations(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "experiments.find_circuit", "--dry_run", "--seq_len=8",
         "--batch_size=2", "--device_memory=1GB", "--method=EAP-IG-activations", "--ig_steps=2",
         "--memory_budget=100MB", f"--out={tmp_path / 'run'}"]
  r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert "memory plan" in r.stdout and "EAP-IG-activations (m=2)" in r.stdout
  assert "largest batch" in r.stdout and "--memory_budget=100MB: the rows in 1 group(s)" in r.stdout
  assert not (tmp_path / "run").exists()
  bad = subprocess.run(cmd[:-1] + ["--level=position"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
  assert bad.returncode == 2 and bad.stdout == ""
  assert bad.stderr.strip().splitlines() == [
      "find_circuit: error: --dry_run plans --method=EAP-IG-activations at --level=edge for EAP, "
      "EAP-IG-inputs, EAP-IG-activations, clean-corrupted and exact only"]


@pytest.mark.parametrize("kind", ["EAP-IG-inputs", "EAP-IG-activations"])
def test_dry_run_plans_the_remat_a_budget_chooses(kind, monkeypatch):
  """A budget that fits one row only rematerialised: the plan builds the remat'd kernel (as the
  run does) and its notes say so."""
  cfg = ModelConfig(**dict(_GPT2, n_layers=4))
  params = MP.abstract_params(cfg, jnp.float32)
  p = 32
  interpolate = "inputs" if kind == "EAP-IG-inputs" else "activations"

  def least(remat):  # the least budget of one row, as the too-small error names it
    with pytest.raises(MB.MemoryBudgetError) as e:
      MB.row_chunks(cfg, params, (_B, p), _STEPS, "1kB", remat, interpolate=interpolate)
    return e.value.least

  assert least(True) < least(False)
  budget = sizes.round_up(least(True) * 1.02)
  seen = {}

  def kernel(*args, **kw):
    seen.update(kw)
    return args[0]

  monkeypatch.setattr(PR.RG, "ig_inputs_batch", kernel)
  build = PR.eap(cfg, params, p, [0.5, 1.0], memory_budget=budget, interpolate=interpolate)
  notes = PR.eap_notes(cfg, params, p, 2, _B, budget, method=kind, interpolate=interpolate)
  fn, args = build(_B)
  fn(*args)
  assert seen["remat"] is True and seen["row_chunks"] == _B
  assert seen["interpolate"] == interpolate
  assert notes[-1].endswith(f"; {kind} runs with --remat: one row fits only rematerialised "
                            "(chosen by the budget, as the run does)"), notes
