"""The mask-training steps (UGS, Edge Pruning): what they compile and how long a step runs.

    python -m benchmarks.mask_steps --out=benchmarks/results/results_cpu_mask_steps.json

For each step (`ugs.train_step`, `edge_pruning.train_step`): the cold AOT compile
(`benchmarks.compile.measure`: optimised HLO instructions, fusions, seconds; JAX's in-memory caches
cleared, no persistent cache) and the warm step time (best and median of --repeats calls after one
untimed call). On the bundled toy with the methods' default options (UGS: 12 mask samples of each
of 5 examples; Edge Pruning: 16 examples, one mask), then, unless --shapes is empty, on each
random-init shape (16 IOI rows, UGS with one sample per row, as the `methods` suite's step rows).
"""

from __future__ import annotations

import sys
import tempfile

import jax
from absl import app, flags

from benchmarks import common
from benchmarks.common import Ctx
from benchmarks.compile import measure
from jaxinterp.attribution import edge_pruning, ugs
from jaxinterp.runtime import inputs

_OUT = flags.DEFINE_string("out", None, "JSON results (none: print only)")
_SHAPES = flags.DEFINE_list("shapes", ["gpt2-small"], "random-init shapes after the toy")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed steps per shape (the toy: 20)")


def steps(cfg, params, ds, u_opts, e_opts, repeats: int) -> dict:
  """{"UGS" / "edge-pruning": compile and step-time figures} on the dataset's first batches."""
  calls = common.mask_step_calls(cfg, ds.task, params, u_opts, e_opts,
                                 next(ds.batches(u_opts.mask_batch, bucket=None)),
                                 next(ds.batches(e_opts.mask_batch, bucket=None)))
  out = {}
  for name, (fn, args) in calls.items():
    m = measure(fn, *args)
    t = common.time_calls(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)[0]), repeats)
    out[name] = dict(hlo_instructions=m["hlo_instructions"], fusions=m["fusions"],
                     compile_s=m["compile_s"], step_best_s=t.best_s, step_median_s=t.median_s)
    print(f"{name:13s} HLO {m['hlo_instructions']:6d} fusions {m['fusions']:5d} compile "
          f"{m['compile_s']:.2f} s  step {t.best_s * 1e3:.1f} ms (median {t.median_s * 1e3:.1f})",
          file=sys.stderr, flush=True)
  return out


def main(argv):
  del argv
  res = {"environment": common.environment()}
  model = inputs.load_model(inputs.TOY)
  ds = inputs.load_dataset(model, inputs.TOY, "induction", None, 64, True, 0)
  print("toy", file=sys.stderr)
  res["toy"] = steps(model.cfg, model.params, ds, ugs.UGSOptions(),
                     edge_pruning.EdgePruningOptions(), max(_REPEATS.value, 20))
  ctx = Ctx(tempfile.mkdtemp(), False)
  for shape in _SHAPES.value:
    cfg, params, _ = ctx.model(shape)
    ds, source = ctx.data(cfg, 32)
    print(shape, source, file=sys.stderr)
    res[shape] = steps(cfg, params, ds, ugs.UGSOptions(ugs_samples=1, mask_batch=16),
                       edge_pruning.EdgePruningOptions(mask_batch=16), _REPEATS.value)
  res["load_average_after"] = common.load_average()
  if _OUT.value:
    common.write_json(res, _OUT.value)


if __name__ == "__main__":
  app.run(main)
