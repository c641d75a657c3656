"""Position-level EAP-IG against edge-level EAP-IG: time and memory of one batch, on IOI prompts
with GPT-2-shaped random weights (issue 28's target: position level costs <= 2x edge level).

    python -m benchmarks.positions                      # 4 layers x 8 heads x d_model 256
    python -m benchmarks.positions --layers=12 --heads=12 --d_model=768 --n=16   # GPT-2 small

Both kernels score one batch of `--n` IOI rows (the first rows of ../shared's EAP-IG IOI CSV,
GPT-2 tokenizer; random equal-length pairs when ../shared is absent) with `--steps` IG steps:
`receiver_grads.ig_inputs_batch` (edge level, what `attribute` runs per batch) and
`attribution.positions.gradient_batch` (position level: non-crossing and crossing edges).
Timed: compile (`lower` + `compile`, no cache) and the warm call (best of `--repeats`, results
blocked on), each kernel alone, in wall-clock seconds and in the process's CPU seconds (all
threads: steadier than wall time when other processes share the cores). Memory: XLA's buffer
assignment of the compiled program (`memory_analysis`: temporaries, arguments, outputs), the
device peak the program needs, and the process's peak RSS growth. The JSON (`--json_out`) holds
the environment (device, load average).
"""

from __future__ import annotations

import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from jaxinterp import attribution as A
from jaxinterp import models
from jaxinterp.attribution import positions as P
from jaxinterp.attribution import receiver_grads as RG

_LAYERS = flags.DEFINE_integer("layers", 4, "Layers of the GPT-2-shaped model.")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads per layer.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Residual width (d_mlp = 4 d_model).")
_N = flags.DEFINE_integer("n", 16, "IOI rows in the batch.")
_STEPS = flags.DEFINE_integer("steps", 5, "IG steps (EAP-IG-inputs).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm calls timed per kernel (best reported).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the figures and environment here.")


def model_config(layers: int, heads: int, d_model: int):
  """GPT-2 small's config (`common.SHAPES`) with its size scaled down."""
  return dataclasses.replace(common.model_config("gpt2-small"), n_layers=layers, n_heads=heads,
                             d_model=d_model, d_head=d_model // heads, d_mlp=4 * d_model)


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def measure(name: str, fn, args: tuple, static: dict, repeats: int) -> dict:
  """Compile `fn` (a `compile_policy.jit`) for `args`, then time its warm calls."""
  rss0 = _rss_mb()
  t0 = time.perf_counter()
  compiled = fn.lower(*args, **static).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  jax.block_until_ready(fn(*args, **static))  # the jit's own first call (its compile, not timed)
  cpu = []

  def call():
    c0 = time.process_time()
    jax.block_until_ready(fn(*args, **static))
    cpu.append(time.process_time() - c0)

  timing = common.time_calls(call, repeats, warmup=False)
  row = dict(kernel=name, compile_s=compile_s, warm_best_s=timing.best_s,
             warm_median_s=timing.median_s, warm_s=timing.times_s, warm_cpu_best_s=min(cpu),
             warm_cpu_s=cpu, rss_growth_mb=_rss_mb() - rss0)
  if mem is not None:
    temp, arg, out = (getattr(mem, f"{k}_size_in_bytes", 0) for k in ("temp", "argument",
                                                                      "output"))
    row.update(temp_mb=temp / 2**20, argument_mb=arg / 2**20, output_mb=out / 2**20,
               peak_mb=(temp + arg + out) / 2**20)
  print(f"{name:>14s}: compile {compile_s:7.2f} s, warm {timing.best_s:7.3f} s (best of "
        f"{repeats}; CPU {min(cpu):.3f} s), XLA peak {row.get('peak_mb', float('nan')):8.1f} MB "
        f"(temp {row.get('temp_mb', float('nan')):.1f} MB)")
  return row


def main(argv):
  del argv
  cfg = model_config(_LAYERS.value, _HEADS.value, _D_MODEL.value)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  ds, source = common.ioi_or_random(_N.value, cfg.d_vocab)
  batch = next(ds.batches(_N.value, bucket=None))
  alphas = jnp.asarray(A.ig_alphas(_STEPS.value), jnp.float32)
  abl = A.Patching()
  args = (cfg, ds.task, params, batch, abl, alphas)
  print(f"{cfg.n_layers} layers x {cfg.n_heads} heads x d_model {cfg.d_model}; {source}; batch "
        f"{batch.clean.shape}; {_STEPS.value} IG steps; load {common.load_average()}")
  edge = measure("edge level", RG.ig_inputs_batch, args, {}, _REPEATS.value)
  pos = measure("position level", P.gradient_batch, args, {"interpolate": "inputs"},
                _REPEATS.value)
  ratio = {k: pos[k] / edge[k] for k in ("compile_s", "warm_best_s", "warm_cpu_best_s",
                                          "peak_mb", "temp_mb")
           if k in pos and k in edge and edge[k]}
  print("position / edge: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
  if _JSON_OUT.value:
    common.write_json(dict(environment=common.environment(), data=source,
                           config=dict(n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                       d_model=cfg.d_model, d_vocab=cfg.d_vocab,
                                       batch=list(batch.clean.shape), ig_steps=_STEPS.value),
                           rows=[edge, pos], ratio=ratio), _JSON_OUT.value)


if __name__ == "__main__":
  app.run(main)
