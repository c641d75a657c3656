"""Benchmark harness: attribution throughput, exact patching, circuit evaluation, whole process.

    python -m benchmarks.run --suite=attribution,exact,evaluation [--quick] [--out=results.json]
    python -m benchmarks.run --suite=whole_process --n=32           # fresh subprocesses, CPU target
    python -m benchmarks.run --suite=all --shapes=gpt2-small,gpt2-medium,pythia-1b,llama-3.1-8b

Suites (comma separated, or "all"):
  attribution    examples/s of EAP, EAP-IG-inputs (m = --steps) and EAP-IG-activations through
                 `jaxinterp.attribution.attribute`; beside them, the eager-torch baseline
                 `benchmarks.torch_baseline.torch_eap_ig_inputs` on the same data and device
                 (GPT-2 shapes only) and the speedup ratio.
  exact          exact patching as `attribute(method="exact")` runs it (each edge reruns the blocks
                 from its receiver's layer on, `vmap` over --exact_chunk edges per call), one chunk
                 timed at a few receiver layers and extrapolated to all edges: edges*examples/s.
  evaluation     circuit evaluation, circuits/s: the circuit forward against the graph-form
                 reference on the MIB curve and --circuits random masks: `benchmarks/evaluation.py`.
  precision      bf16 params vs fp32: Pearson correlation of EAP-IG scores, and the time of each.
  scaling        time against the number of examples (attribute and the torch baseline).
  memory         the EAP-IG kernel's memory at --batch_size x --seq (bf16 weights), from XLA's
                 compile-time buffer assignment (`Compiled.memory_analysis()`) on abstract
                 arguments: nothing is allocated, so an 8B shape can be checked on a laptop. The
                 figures are the compiling backend's (XLA:CPU here); a GPU's differ somewhat.
  methods        every registered method (and its node/neuron levels, an ensemble, a bootstrap)
                 through `attribute`, cold and warm: `benchmarks/methods.py` (rows: its CASES).
  whole_process  EAP-IG (m = --steps) on --n IOI examples, each implementation in a fresh Python
                 process (imports, model load, tokenisation, compile and run all counted):
                 jaxinterp, the eager-torch baseline (answer logits only, and full logits as the
                 `eap` package computes them) and, when TransformerLens 3.x is installed, the
                 reference algorithm on HookedTransformer hooks (`benchmarks.tl_baseline`).
  pipeline       find_circuit (EAP-IG, a 10-point MIB curve, outputs written) against `attribute`
                 alone and the `eap` package when installed, each a fresh process, no compile cache
                 (`benchmarks/pipeline.py`): wall times, find_circuit's phases, the ratio.
  compile        every kernel's optimised HLO size and cold compile time (AOT, no persistent
                 cache) on the bundled toy model and each shape, and the quickstart's compile share
                 (`benchmarks/compile.py`).
  das            DAS training on a toy model trained on the spot (`benchmarks/das.py`; once, not per
                 shape): per-step time and IIA at 500 steps at site widths 64 and 256, against
                 pyvene when `import pyvene` works (its rows are left out otherwise).

Every timing is taken after a warm-up call with the same shapes (the compile), with
`block_until_ready` (or a host transfer) at the end, repeated --repeats times; the warm-up time is
reported separately as `first_call_s`. The JSON results hold the environment (device, jax version,
load average), the dtype, the batch size and every figure.

Models are random-init (there are no real weights here). GPT-2 shapes are real HF checkpoints
(`transformers.GPT2LMHeadModel`, saved and read back by `models.from_pretrained`) so that the torch
baseline runs the very same weights; other shapes come from `models.init_params`. Data are the first
--n IOI examples from ../shared when present (GPT-2 vocabulary), else random equal-length pairs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common, das, evaluation, methods, pipeline
from benchmarks import compile as compile_suite
from benchmarks.common import Ctx
from jaxinterp import attribution as A
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models import edges as E
from jaxinterp.models import init_params
from jaxinterp.tasks import Batch
from jaxinterp.tasks import metrics as task_metrics

SUITES = ("attribution", "exact", "evaluation", "precision", "scaling", "whole_process", "memory",
          "methods", "das", "pipeline", "compile")

_SUITE = flags.DEFINE_string("suite", "attribution",
                             f"comma-separated suites from {SUITES}, or all")
_QUICK = flags.DEFINE_boolean("quick", False, "tiny shapes and few examples (CI smoke run, < 60 s)")
_OUT = flags.DEFINE_string("out", "results.json", "where to write the JSON results")
_SHAPES = flags.DEFINE_string("shapes", None, "comma-separated model shapes (default: gpt2-small "
                              "on CPU, GPT-2 small/medium/XL, Pythia-1B and Llama-3.1-8B on GPU)")
_N = flags.DEFINE_integer("n", None, "examples (default 32; 8 with --quick)")
_BATCH = flags.DEFINE_integer("batch_size", None,
                              "examples per compiled call (default 16; 4 quick)")
_STEPS = flags.DEFINE_integer("steps", 5, "integrated-gradient steps m")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed repetitions after the warm-up")
_METHODS = flags.DEFINE_string("methods", None, "attribution methods (default: EAP, EAP-IG-inputs, "
                               "EAP-IG-activations; the last only on tiny shapes on CPU)")
_EXACT_EDGES = flags.DEFINE_integer("exact_edges", None, "edges timed in the exact suite (default "
                                    "2 chunks)")
_EXACT_CHUNK = flags.DEFINE_integer("exact_chunk", None, "edges per compiled exact-patching call "
                                    "(default: attribution.exact_chunk_size, memory-bounded)")
_EXACT_BATCH = flags.DEFINE_integer("exact_batch", 4, "examples per exact-patching call")
_CIRCUITS = flags.DEFINE_integer("circuits", 16, "circuits evaluated in the evaluation suite")
_CHUNK = flags.DEFINE_integer("chunk", 8, "circuits per vmapped call of the reference evaluation")
_TORCH = flags.DEFINE_boolean("torch", True, "measure the eager-torch baseline")
_WORKDIR = flags.DEFINE_string("workdir", None, "where random-init checkpoints are written "
                               "(default: a temporary directory)")
_SEQ = flags.DEFINE_integer("seq", 16, "prompt length of the memory suite")
_SCALING_N = flags.DEFINE_string("scaling_n", "16,32,64", "example counts of the scaling suite")


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def _ready(x):
  return jax.block_until_ready(x)


def _torch_model(hf_dir: str):
  import torch
  import transformers
  m = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
  if torch.cuda.is_available():
    m = m.cuda()
  return m


def suite_attribution(ctx: Ctx, shape: str, n: int, batch: int, steps: int, repeats: int) -> list:
  cfg, params, hf_dir = ctx.model(shape)
  ds, source = ctx.data(cfg, n)
  methods = _METHODS.value.split(",") if _METHODS.value else ["EAP", "EAP-IG-inputs"] + (
      ["EAP-IG-activations"] if (shape == "tiny" or _on_gpu()) else [])
  rows = []
  base = dict(suite="attribution", shape=shape, n_params=common.n_params(cfg), n_examples=len(ds),
              batch_size=batch, seq_len=ds.max_len, data=source, dtype="float32", ig_steps=steps)
  for method in methods:
    log(f"[attribution] {shape} {method}")
    def fn(method=method):
      return A.attribute(cfg, params, ds, method=method, batch_size=batch, quiet=True,
                         **A.get_method(method).options_among({"ig_steps": steps}))
    t = common.time_calls(fn, repeats)
    row = dict(base, method=method, kernel="attribute", **t.as_dict(),
               examples_per_s=len(ds) / t.best_s)
    if method in ("EAP", "EAP-IG-inputs"):
      flops = common.eap_ig_flops(cfg, len(ds), ds.max_len, steps if method != "EAP" else 1)
      peak = common.matmul_peak_gflop_s()
      row.update(required_tflop=flops / 1e12, achieved_gflop_s=flops / t.best_s / 1e9,
                 matmul_peak_gflop_s=peak, fraction_of_matmul_peak=flops / t.best_s / 1e9 / peak)
    rows.append(row)
  if _TORCH.value and hf_dir is not None:
    import torch  # optional: the torch baseline

    from benchmarks.torch_baseline import torch_eap_ig_inputs
    log(f"[attribution] {shape} torch baseline")
    tm = _torch_model(hf_dir)
    dev = next(tm.parameters()).device
    tensors = [x.to(dev) for x in common.torch_batch(ds)]

    def fn():
      s = torch_eap_ig_inputs(tm, *tensors, steps=steps, batch_size=batch)
      if dev.type == "cuda":
        torch.cuda.synchronize()
      return s

    t = common.time_calls(fn, repeats)
    torch_row = dict(base, method="EAP-IG-inputs", kernel="torch-eager-baseline", **t.as_dict(),
                     examples_per_s=len(ds) / t.best_s, torch_threads=torch.get_num_threads())
    rows.append(torch_row)
    for r in rows:
      if r["method"] == "EAP-IG-inputs" and r["kernel"] != "torch-eager-baseline":
        r["speedup_vs_torch"] = torch_row["best_s"] / r["best_s"]
  return rows


def suite_exact(ctx: Ctx, shape: str, n: int, batch: int, repeats: int) -> list:
  """Exact patching as `attribute(method="exact")` runs it: edges grouped by receiver layer, each
  group rerunning only the blocks from that layer on (cached upstream) over each row's suffix after
  the clean/corrupted shared prefix (`rerun_positions`), `--exact_chunk` edges per vmapped call.
  One chunk is timed at a few receiver layers; the total is extrapolated over all
  edges with the per-chunk time interpolated linearly in the layer (the work is ~ L - l blocks).
  """
  cfg, params, _ = ctx.model(shape)
  batch = _EXACT_BATCH.value
  ds, source = ctx.data(cfg, batch)
  b = next(ds.batches(batch))
  abl = A.Patching()
  valid = valid_edges(cfg)
  s_idx, r_idx = np.nonzero(valid)
  L = cfg.n_layers
  layer_of = np.minimum(r_idx // (3 * cfg.n_heads + 1), L)
  _, _, clean_logits = task_metrics.clean_metric(cfg, ds.task, params, b)
  if clean_logits is not None:
    clean_logits = jnp.take_along_axis(clean_logits, b.last[:, None, None], axis=1)
  width, run, positions = A.exact.suffix(cfg, b, abl)  # the shared prefix is not rerun
  chunk = _EXACT_CHUNK.value or A.exact_chunk_size(cfg, *run.clean.shape)
  resids, mlp_inputs, delta, kv_prefix = A.exact.upstream_cache(cfg, params, b, abl, width)
  sample = sorted({0, L // 2, L}) if L > 2 else list(range(L + 1))
  per_layer = {}
  rows = []
  for layer in sample:
    edges = np.flatnonzero(layer_of == layer)
    sel = np.resize(edges, chunk)
    n_up = E.n_upstream_of_mlp(cfg, layer) if layer < L else E.n_senders(cfg)
    args = (cfg, ds.task, layer, params, run, resids[layer], mlp_inputs[min(layer, L - 1)],
            delta[:, :, :n_up], jnp.asarray(s_idx[sel], jnp.int32),
            jnp.asarray(r_idx[sel], jnp.int32), clean_logits, positions, kv_prefix)
    log(f"[exact] {shape}: receiver layer {layer}, {chunk} edges x {batch} examples")
    t = common.time_calls(lambda args=args: _ready(A.exact.edge_chunk(*args)), repeats)
    per_layer[layer] = t.best_s
    rows.append(dict(suite="exact", shape=shape, receiver_layer=layer, chunk_edges=chunk,
                     n_examples=batch, **t.as_dict()))
  timed = np.array(sorted(per_layer))
  est = 0.0
  for layer in range(L + 1):
    n_layer = int((layer_of == layer).sum())
    est += math.ceil(n_layer / chunk) * float(np.interp(layer, timed,
                                                        [per_layer[x] for x in timed]))
  n_edges = int(valid.sum())
  rate = n_edges * batch / est
  rows.append(dict(suite="exact", shape=shape, summary=True, kernel="attribution.exact.edge_chunk",
                   n_examples=batch, batch_size=batch, seq_len=ds.max_len, data=source,
                   rerun_positions=int(run.clean.shape[1]),
                   dtype="float32", edges_total=n_edges, exact_chunk=chunk, layers_timed=sample,
                   estimated_all_edges_one_batch_s=est, edges_examples_per_s=rate,
                   extrapolated_all_edges_100_examples_s=n_edges * 100 / rate,
                   note="one chunk timed per sampled receiver layer (after its compile), "
                        "extrapolated to all edges; compile of the other layers' kernels not "
                        "counted"))
  return rows


def suite_precision(ctx: Ctx, shape: str, n: int, batch: int, steps: int, repeats: int) -> list:
  rows = []
  cfg, p32, _ = ctx.model(shape)
  _, p16, _ = ctx.model(shape, jnp.bfloat16)
  ds, source = ctx.data(cfg, n)
  valid = valid_edges(cfg)
  out = {}
  for name, params in (("float32", p32), ("bfloat16", p16)):
    log(f"[precision] {shape} {name}")
    box = {}

    def fn(params=params, box=box):
      box["s"] = A.attribute(cfg, params, ds, method="EAP-IG-inputs", ig_steps=steps,
                             batch_size=batch, quiet=True).scores
    t = common.time_calls(fn, repeats)
    out[name] = box["s"][valid]
    rows.append(dict(suite="precision", shape=shape, dtype=name, n_examples=len(ds),
                     batch_size=batch, data=source, **t.as_dict()))
  a, b = out["float32"].astype(np.float64), out["bfloat16"].astype(np.float64)
  pearson = float(np.corrcoef(a, b)[0, 1])
  top = max(1, a.size // 100)
  ta, tb = set(np.argsort(-np.abs(a))[:top]), set(np.argsort(-np.abs(b))[:top])
  rows.append(dict(suite="precision", shape=shape, summary=True, pearson_bf16_vs_fp32=pearson,
                   top1pct_overlap=len(ta & tb) / top,
                   max_abs_diff=float(np.abs(a - b).max()), max_abs_fp32=float(np.abs(a).max())))
  return rows


def suite_scaling(ctx: Ctx, shape: str, batch: int, steps: int, repeats: int) -> list:
  cfg, params, hf_dir = ctx.model(shape)
  ns = [int(x) for x in _SCALING_N.value.split(",")]
  if ctx.quick:
    ns = [4, 8]
  rows = []
  tm = _torch_model(hf_dir) if (hf_dir and _TORCH.value) else None
  for n in ns:
    ds, source = ctx.data(cfg, n)
    log(f"[scaling] {shape} n={n}")
    t = common.time_calls(lambda ds=ds: A.attribute(cfg, params, ds, ig_steps=steps,
                                                    batch_size=batch, quiet=True), repeats)
    rows.append(dict(suite="scaling", shape=shape, kernel="attribute", n_examples=len(ds),
                     batch_size=batch, data=source, **t.as_dict()))
    if tm is not None:
      from benchmarks.torch_baseline import torch_eap_ig_inputs  # optional: imports torch
      tensors = common.torch_batch(ds)
      t = common.time_calls(lambda tensors=tensors: torch_eap_ig_inputs(
          tm, *tensors, steps=steps, batch_size=batch), 1, warmup=False)
      rows.append(dict(suite="scaling", shape=shape, kernel="torch-eager-baseline",
                       n_examples=len(ds), batch_size=batch, data=source, **t.as_dict()))
  return rows


def suite_memory(ctx: Ctx, shape: str, batch: int, steps: int) -> list:
  """Compile the EAP-IG kernel for a shape on abstract (shape-only) arguments; report its memory.

  float32 and bfloat16 weights. On XLA:CPU bf16 dots are computed in f32 with converted copies of
  the weights, so the CPU's bf16 figure overstates what a GPU (native bf16 matmuls) needs.
  """
  cfg = common.model_config(shape)
  seq = _SEQ.value
  sd = jax.ShapeDtypeStruct
  proto = common.random_pairs(2, 100, 4)  # the logit-difference task; only shapes are used
  task = proto.task
  labels = {k: sd((batch,) + v.shape[1:], v.dtype) for k, v in proto.labels.items()}
  b = Batch(clean=sd((batch, seq), jnp.int32), corrupted=sd((batch, seq), jnp.int32),
            mask=sd((batch, seq), jnp.bool_), last=sd((batch,), jnp.int32), labels=labels,
            valid=sd((batch,), jnp.bool_))
  rows = []

  def gib(x):
    return x / 2**30

  for dtype in ("float32", "bfloat16"):
    params = jax.eval_shape(lambda dtype=dtype: init_params(cfg, jax.random.PRNGKey(0),
                                                            getattr(jnp, dtype)))
    log(f"[memory] {shape}: compiling the EAP-IG kernel for batch {batch} x {seq} ({dtype})")
    t0 = time.perf_counter()
    compiled = RG.ig_inputs_batch.lower(cfg, task, params, b, A.Patching(),
                                        sd((steps,), jnp.float32)).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    rows.append(dict(suite="memory", shape=shape, backend=jax.default_backend(), dtype=dtype,
                     batch_size=batch, seq_len=seq, ig_steps=steps, n_params=common.n_params(cfg),
                     compile_s=time.perf_counter() - t0, argument_gib=gib(m.argument_size_in_bytes),
                     temp_gib=gib(m.temp_size_in_bytes), output_gib=gib(m.output_size_in_bytes),
                     total_gib=gib(total), fits_80gb=total < 80e9))
  return rows


def suite_whole_process(ctx: Ctx, shape: str, n: int, batch: int, steps: int, repeats: int) -> list:
  if common.SHAPES[shape]["family"] != "gpt2":
    return []
  d = common.gpt2_checkpoint(os.path.join(ctx.workdir, shape), shape)
  rows = []
  env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
  runs = [("jax", "attribute"), ("jax", "attribute, warm compilation cache")]
  runs += [("torch", ""), ("torch-full-logits", "")] if _TORCH.value else []
  if _TORCH.value and _have_hooked_transformer_lens():
    runs.append(("transformer-lens", ""))
  for rep in range(max(1, repeats // 2) if not ctx.quick else 1):
    # fresh: the first jax run fills it
    cache = tempfile.mkdtemp(prefix="xla-cache-", dir=ctx.workdir)
    for impl, kernel in runs:
      log(f"[whole_process] {shape} {impl} {kernel} (fresh process)")
      cmd = [sys.executable, "-m", "benchmarks.whole_process", f"--impl={impl}",
             f"--checkpoint={d}", f"--n={n}", f"--steps={steps}", f"--batch_size={batch}"]
      if impl == "jax":  # both jax runs write/read the cache; the first (cold) finds it empty
        cmd.append(f"--compilation_cache={cache}")
      load = common.load_average()
      t0 = time.perf_counter()
      p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(common.REPO))
      wall = time.perf_counter() - t0
      lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
      if p.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
      r = json.loads(lines[-1][len("RESULT "):])
      r.pop("kernel", None)
      r.pop("impl", None)
      rows.append(dict(suite="whole_process", shape=shape, impl=impl, kernel=kernel or impl,
                       repeat=rep, batch_size=batch, ig_steps=steps, subprocess_wall_s=wall,
                       load_average_before=load, **r))
  for rep in {r["repeat"] for r in rows}:
    rs = [r for r in rows if r["repeat"] == rep]
    torch_rows = [r for r in rs if r["impl"] == "torch"]
    full_rows = [r for r in rs if r["impl"] == "torch-full-logits"]
    tl_rows = [r for r in rs if r["impl"] == "transformer-lens"]
    for r in rs:
      if tl_rows and r["impl"] == "jax":
        r["speedup_vs_transformer_lens"] = tl_rows[0]["subprocess_wall_s"] / r["subprocess_wall_s"]
      if torch_rows and r["impl"] == "jax":
        r["speedup_vs_torch"] = torch_rows[0]["subprocess_wall_s"] / r["subprocess_wall_s"]
      if full_rows and r["impl"] == "jax":
        r["speedup_vs_torch_full_logits"] = (full_rows[0]["subprocess_wall_s"]
                                             / r["subprocess_wall_s"])
  return rows


def _have_hooked_transformer_lens() -> bool:
  """Whether a TransformerLens with `HookedTransformer` (< 4.0) is installed."""
  import importlib.util
  if importlib.util.find_spec("transformer_lens") is None:
    return False
  import transformer_lens
  return hasattr(transformer_lens, "HookedTransformer")


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def main(argv):
  del argv
  suites = SUITES if _SUITE.value == "all" else tuple(s.strip() for s in _SUITE.value.split(","))
  bad = [s for s in suites if s not in SUITES]
  if bad:
    raise common.BenchmarkError(f"unknown suite(s) {bad}; choose from {SUITES} or 'all'")
  quick = _QUICK.value
  if _SHAPES.value:
    shapes = _SHAPES.value.split(",")
    for s in shapes:
      if s not in common.SHAPES:
        raise common.BenchmarkError(f"unknown shape {s!r}; choose from {sorted(common.SHAPES)}")
  elif quick:
    shapes = ["tiny"]
  elif _on_gpu():
    shapes = ["gpt2-small", "gpt2-medium", "gpt2-xl", "pythia-1b", "llama-3.1-8b"]
  else:
    shapes = ["gpt2-small"]
  n = _N.value or (8 if quick else 32)
  batch = _BATCH.value or (4 if quick else 16)
  steps = _STEPS.value
  repeats = 1 if quick else _REPEATS.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="jaxinterp-bench-")
  os.makedirs(workdir, exist_ok=True)
  ctx = Ctx(workdir, quick)
  results = dict(environment=common.environment(), config=dict(
      suites=list(suites), shapes=shapes, n_examples=n, batch_size=batch, ig_steps=steps,
      repeats=repeats, quick=quick), results=[])
  t_start = time.perf_counter()
  for shape in shapes:
    for suite in suites:
      if suite == "attribution":
        rows = suite_attribution(ctx, shape, n, batch, steps, repeats)
      elif suite == "exact":
        rows = suite_exact(ctx, shape, n, batch, repeats)
      elif suite == "evaluation":
        rows = evaluation.suite_evaluation(ctx, shape, n, batch, repeats, _CIRCUITS.value,
                                           _CHUNK.value)
      elif suite == "precision":
        rows = suite_precision(ctx, shape, n, batch, steps, repeats)
      elif suite == "scaling":
        rows = suite_scaling(ctx, shape, batch, steps, repeats)
      elif suite == "memory":
        rows = suite_memory(ctx, shape, batch, steps)
      elif suite == "methods":
        rows = methods.suite_methods(ctx, shape, n, batch, steps, repeats)
      elif suite == "pipeline":
        rows = pipeline.suite_pipeline(ctx, shape, n, batch, steps, repeats)
      elif suite == "compile":
        rows = compile_suite.suite_compile(ctx, shape, n, steps, first=shape == shapes[0])
      elif suite == "das":
        rows = das.suite_das(workdir, quick, log=log) if shape == shapes[0] else []
      else:
        rows = suite_whole_process(ctx, shape, n, batch, steps, repeats)
      results["results"].extend(rows)
      common.write_json(results, _OUT.value)  # partial results survive an interrupted run
  results["total_s"] = time.perf_counter() - t_start
  results["environment"]["load_average_end"] = common.load_average()
  common.write_json(results, _OUT.value)
  log(f"wrote {_OUT.value} ({len(results['results'])} rows, {results['total_s']:.1f} s)")


if __name__ == "__main__":
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  app.run(main)
