"""The `compile` suite: what XLA is given, kernel by kernel, and how long it takes to compile it.

    python -m benchmarks.run --suite=compile --shapes=gpt2-small --out=results.json

For the bundled toy model (the quickstart's, once per run) and for each --shapes shape (random-init,
the first --n IOI examples or random pairs), every kernel a method runs is traced, lowered and
compiled ahead of time on the data's first batch (`jax.jit(f).trace(...).lower().compile()`), in
this process, with no persistent compilation cache (cold: nothing is read back). Per kernel a row
holds the number of distinct programs it compiles for one batch shape (ACDC compiles one per
receiver layer), `hlo_instructions` (instructions of the optimised HLO module,
`Compiled.as_text()`, summed over its programs), `fusions` (the fused kernels XLA:CPU generates
code for: its compile time is mostly LLVM on these) and trace / lower / compile seconds.

Kernels: EAP and EAP-IG-inputs (`receiver_grads.ig_inputs_batch`, also at 4x the IG steps: the
program must not grow with them), EAP-IG-activations, exact patching as `attribute` compiles it
(`exact.upstream_cache`, `exact.edge_chunk_scan`: one program for the edges into every block, and
`exact.edge_chunk` for the logits receiver; `edge_chunk` per layer where blocks can't be scanned),
ACDC's programs (`acdc_trials`: the circuit forward from the receivers' layer, as data), the UGS and
Edge Pruning mask-training steps, the circuit forward's `prepare` and `circuit_metric` (one program
for every circuit size), an optimal-ablation training step (`optimal.make_step`) and a DAS training
step (`interventions.training.make_train_step`, one rotated-space site). The bundled attribution
graph (toy_mlp and its transcoders) is timed as one whole call: its phases and the programs it
compiles. On the toy, EAP-IG-inputs is also compiled on random-init models of its width with 1, 2
and 4 layers (how the program grows with depth). Then, on the toy, the quickstart runs as a fresh
process with `--compilation_cache=` (`python -m experiments.find_circuit`), and its phases
(graph.json's `meta`) give the share of the run spent compiling (the issue's target: at most 25%),
three times under each compile policy (`jaxinterp.runtime.compile_policy`:
$JAXINTERP_COMPILE_POLICY=full, XLA's full optimisation (the default), and the opt-in "fast", where
the toy compiles with `FAST_COMPILE`), alternating. The kernel rows are compiled as the library
compiles them: with XLA's defaults, or on the toy with `FAST_COMPILE` when this process runs under
$JAXINTERP_COMPILE_POLICY=fast.

The CPU is shared: compile seconds move with the load (recorded in the environment); HLO sizes do
not. Compare seconds within one run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from jaxinterp import attribution as A
from jaxinterp.attribution import (
    acdc,
    edge_pruning,
    exact,
    optimal,
    receiver_grads,
    ugs,
)
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.interventions import basic
from jaxinterp.interventions import training as tr
from jaxinterp.models import edges as E
from jaxinterp.models import init_params
from jaxinterp.runtime import compile_policy, inputs, shared_prefix, timing
from jaxinterp.transcoders import pipeline as tc_pipeline

QUICKSTART_TARGET = 0.25  # compile at most this share of the quickstart's phases (issue 30)
QUICKSTART_RUNS = 3  # fresh processes per compile policy
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+ = ")


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def hlo_size(compiled) -> tuple[int, int]:
  """(instructions, fusions) of a compiled program's optimised HLO module."""
  text = compiled.as_text()
  lines = text.splitlines()
  return (sum(1 for line in lines if _INSTRUCTION.match(line)),
          sum(1 for line in lines if " fusion(" in line))


def measure(jitted, *args, **kwargs) -> dict:
  """Trace, lower and compile `jitted(*args, **kwargs)` (AOT, nothing run): seconds and size.
  JAX's in-memory caches are cleared first, so an identical program compiles again."""
  jax.clear_caches()
  t0 = time.perf_counter()
  traced = jitted.trace(*args, **kwargs)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  n, fusions = hlo_size(compiled)
  return dict(programs=1, hlo_instructions=n, fusions=fusions, trace_s=t1 - t0, lower_s=t2 - t1,
              compile_s=t3 - t2)


def _sum(rows: list[dict]) -> dict:
  return {k: sum(r[k] for r in rows) for k in rows[0]}


def kernels(cfg, params, dataset, steps: int) -> dict[str, dict]:
  """{kernel: measure()} for every kernel on the dataset's first batch."""
  task = dataset.task
  batch = next(iter(dataset.batches(min(16, len(dataset)))))
  abl = A.make_ablation(cfg, params, dataset, "patching", len(batch.clean))
  sfx = shared_prefix.plan(cfg, batch, abl.kind)
  out = {}

  def ig(alphas):
    return measure(receiver_grads.ig_inputs_batch, cfg, task, params, batch, abl,
                   jnp.asarray(alphas, jnp.float32), suffix=sfx)

  log("[compile] EAP, EAP-IG-inputs")
  out["EAP"] = ig([1.0])
  out["EAP-IG-inputs"] = ig(A.ig_alphas(steps))
  out[f"EAP-IG-inputs x{4 * steps} steps"] = ig(A.ig_alphas(4 * steps))
  log("[compile] EAP-IG-activations")
  out["EAP-IG-activations"] = measure(receiver_grads.ig_inputs_batch, cfg, task, params, batch,
                                      abl, jnp.asarray(A.ig_alphas(steps, eap_start=1)),
                                      interpolate="activations")
  log("[compile] exact")
  width, run, positions = exact.suffix(cfg, batch, abl)
  resids, mlp_inputs, delta, kv = exact.upstream_cache(cfg, params, batch, abl, width)
  rows = [measure(exact.upstream_cache, cfg, params, batch, abl, width)]
  clean_last = jnp.zeros((batch.clean.shape[0], 1, cfg.d_vocab), jnp.float32)
  chunk = 8
  idx = jnp.zeros((chunk,), jnp.int32)
  logits_arg = clean_last if task.needs_clean_logits else None
  scanned = exact.scan_layers(cfg, params)  # one program for every block layer, as `attribute`
  if scanned:
    stacked = exact.stacked_blocks(cfg, params)
    rows.append(measure(exact.edge_chunk_scan, cfg, task, params, stacked, run,
                        jnp.asarray(0, jnp.int32), resids, mlp_inputs, delta, idx, idx,
                        logits_arg, positions, kv))
  for li in range(cfg.n_layers + 1):
    if scanned and li < cfg.n_layers:
      continue
    n_up = E.n_upstream_of_mlp(cfg, li) if li < cfg.n_layers else E.n_senders(cfg)
    rows.append(measure(exact.edge_chunk, cfg, task, li, params, run, resids[li],
                        mlp_inputs[min(li, cfg.n_layers - 1)], delta[:, :, :n_up], idx, idx,
                        logits_arg, positions, kv))
  out["exact"] = _sum(rows)
  log("[compile] ACDC")
  out["ACDC trials"] = acdc_trials(cfg, params, batch, abl)
  calls = common.mask_step_calls(
      cfg, task, params, ugs.UGSOptions(ugs_samples=1, mask_batch=len(batch.clean), mask_steps=1),
      edge_pruning.EdgePruningOptions(mask_batch=len(batch.clean), mask_steps=1), batch, batch)
  for name, (fn, args) in calls.items():
    log(f"[compile] {name} step")
    out[f"{name} step"] = measure(fn, *args)
  log("[compile] circuit forward")
  fwd = CF.CircuitForward(cfg, params, task, valid_edges(cfg))
  csfx = shared_prefix.plan(fwd.cfg, batch, abl.kind)
  out["circuit prepare"] = measure(CF.prepare, fwd.cfg, task, fwd.params, batch, abl, csfx)
  prep = CF.prepare(fwd.cfg, task, fwd.params, batch, abl, csfx)
  out["circuit metric"] = measure(CF.circuit_metric, fwd.cfg, task, fwd.params, batch, prep,
                                  jnp.asarray(valid_edges(cfg), jnp.float32),
                                  CF.scratch_like(fwd.cfg, prep), fwd.stacked)
  log("[compile] optimal-ablation step")
  out["optimal-ablation step"] = _optimal_step(cfg, params, batch)
  log("[compile] DAS step")
  out["DAS step"] = _das_step(cfg, params, batch)
  return out


def _optimal_step(cfg, params, batch) -> dict:
  """One optimal-ablation training step (`optimal.make_step`, the `lm` objective) on the batch,
  with the default chunk (`optimal.oa_chunk_size`): every sender at once on the toy, 4 at a time
  on GPT-2 small's batch of 16 (all 157 at once need tens of GB)."""
  opts = optimal.OptimalOptions()
  opt = optax.adam(opts.oa_lr)
  values = jnp.zeros((E.n_senders(cfg), cfg.d_model), jnp.float32)
  return measure(optimal.make_step(cfg, opts, opt), params, values, opt.init(values), batch)


def acdc_trials(cfg, params, batch, abl) -> dict:
  """ACDC's programs: the circuit forward's `prepare` (KL task), the clean sender rows, and the
  trial (`circuit_metric` from the receivers' layer, as data: one program for every layer)."""
  fwd = CF.CircuitForward(cfg, params, acdc.KL, valid_edges(cfg))
  prep = CF.prepare(fwd.cfg, acdc.KL, fwd.params, batch, abl)
  rows = acdc.clean_deltas(fwd.cfg, fwd.params, batch, prep)
  return _sum([measure(CF.prepare, fwd.cfg, acdc.KL, fwd.params, batch, abl),
               measure(acdc.clean_deltas, fwd.cfg, fwd.params, batch, prep),
               measure(CF.circuit_metric, fwd.cfg, acdc.KL, fwd.params, batch, prep,
                       jnp.asarray(valid_edges(cfg), jnp.float32), rows, fwd.stacked,
                       jnp.asarray(0, jnp.int32))])


def _das_step(cfg, params, batch) -> dict:
  """One DAS training step: a 1-dim rotated space at the last block's output, interchange batches
  of the data's clean (base) and corrupted (source) prompts at their last position."""
  site = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
  tmpl = {site: tr.init_rotated_space(jax.random.PRNGKey(0), cfg.d_model, 1,
                                      where=basic.Where.of(positions=-1))}
  b = len(batch.clean)
  data = {"base": batch.clean, "source": batch.corrupted, "base_mask": batch.mask,
          "source_mask": batch.mask, "label": jnp.zeros((b,), jnp.int32)}
  tparams = tr.trainable_params(tmpl)
  opt = optax.adam(1e-2)
  step = tr.make_train_step(cfg, opt)
  return measure(step, tparams, opt.init(tparams), tmpl, params, data)


def _toy_layers(n_layers: int):
  """A random-init model of the bundled toy's shape with `n_layers` blocks."""
  cfg = dataclasses.replace(inputs.load_model(inputs.TOY).cfg, n_layers=n_layers)
  return cfg, init_params(cfg, jax.random.PRNGKey(0))


def quickstart_row(policy: str = "fast", run: int = 1) -> dict:
  """The quickstart as a fresh process with no persistent cache, under $JAXINTERP_COMPILE_POLICY
  `policy` ("fast": the toy compiles with `compile_policy.FAST_COMPILE`; "full": XLA's full
  optimisation, as before the policy): its phases and compile share."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "run")
    cmd = [sys.executable, "-m", "experiments.find_circuit", "--compilation_cache=", f"--out={out}"]
    env = dict(os.environ, JAXINTERP_COMPILATION_CACHE="", **{compile_policy.ENV: policy})
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("XLA_FLAGS", None)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(common.REPO))
    wall = time.perf_counter() - t0
    if p.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "graph.json")) as f:
      meta = json.load(f)["meta"]
  phases = meta["phase_seconds"]
  share = compile_share(phases)
  return dict(suite="compile", shape="toy", case=f"quickstart phases, compile policy {policy}",
              command=f"{compile_policy.ENV}={policy} python -m experiments.find_circuit "
                      "--compilation_cache=", run=run,
              subprocess_wall_s=wall, phase_seconds=phases,
              compile_seconds=meta.get("compile_seconds"), compile_share=share,
              compile_share_target=QUICKSTART_TARGET, meets_target=share <= QUICKSTART_TARGET)


def attribution_graph_row() -> dict:
  """The bundled attribution graph (`transcoders.pipeline.attribution_graph` with its defaults:
  toy_mlp, its transcoders, the induction prompt), one whole call in this process with JAX's
  in-memory caches cleared and no persistent cache: its phases, compile share and the number of
  programs XLA compiled (backend compile events)."""
  programs = []

  def count(event: str, duration_secs: float, **_) -> None:
    if timing.COMPILE_EVENTS.get(event) == "backend":
      programs.append(duration_secs)

  jax.clear_caches()
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    with tempfile.TemporaryDirectory() as tmp:
      summary = tc_pipeline.attribution_graph(tc_pipeline.AttributionGraphConfig(),
                                              os.path.join(tmp, "graph"))
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  phases = summary["phase_seconds"]
  return dict(suite="compile", shape="toy_mlp", case="attribution graph, whole call (bundled)",
              programs=len(programs), backend_compile_s=sum(programs), phase_seconds=phases,
              compile_share=compile_share(phases), nodes=summary["nodes"])


def compile_share(phases: dict) -> float:
  """compile / the sum of the phases (not counting "total")."""
  parts = {k: v for k, v in phases.items() if k != "total"}
  return parts["compile"] / sum(parts.values())


def suite_compile(ctx, shape: str, n: int, steps: int, first: bool) -> list[dict]:
  """Rows of the compile suite for `shape` (and, when `first`, the bundled toy's)."""
  rows = []
  if first:
    model = inputs.load_model(inputs.TOY)
    ds = inputs.load_dataset(model, inputs.TOY, "induction", None, 16, True, 0)
    base = dict(suite="compile", shape="toy", batch_size=len(ds), seq_len=ds.max_len,
                ig_steps=steps, n_layers=model.cfg.n_layers, data="induction (the quickstart's)")
    for kernel, r in kernels(model.cfg, model.params, ds, steps).items():
      rows.append(dict(base, case=kernel, **r))
    for n_layers in (1, 2, 4):
      log(f"[compile] toy EAP-IG-inputs, {n_layers} layers")
      cfg, params = _toy_layers(n_layers)
      batch = next(iter(ds.batches(len(ds))))
      abl = A.make_ablation(cfg, params, ds, "patching", len(ds))
      r = measure(receiver_grads.ig_inputs_batch, cfg, ds.task, params, batch, abl,
                  jnp.asarray(A.ig_alphas(steps), jnp.float32),
                  suffix=shared_prefix.plan(cfg, batch, abl.kind))
      rows.append(dict(base, case=f"EAP-IG-inputs, {n_layers} layers (random init)",
                       **dict(r, n_layers=n_layers)))
    log("[compile] attribution graph (bundled)")
    rows.append(attribution_graph_row())
    for run in range(1, QUICKSTART_RUNS + 1):  # alternating, so both see the same load
      for policy in ("full", "fast"):
        log(f"[compile] quickstart, compile policy {policy}, run {run}")
        rows.append(quickstart_row(policy, run))
  if shape != "tiny" or not first:
    cfg, params, _ = ctx.model(shape)
    ds, source = ctx.data(cfg, n)
    base = dict(suite="compile", shape=shape, batch_size=min(16, len(ds)), seq_len=ds.max_len,
                ig_steps=steps, n_layers=cfg.n_layers, data=source)
    for kernel, r in kernels(cfg, params, ds, steps).items():
      rows.append(dict(base, case=kernel, **r))
  for r in rows:
    if "compile_s" in r:
      log(f"[compile] {r['shape']:10s} {r['case']:40s} programs {r['programs']:2d} HLO "
          f"{r['hlo_instructions']:6d} fusions {r['fusions']:4d} compile {r['compile_s']:.2f} s")
  return rows
