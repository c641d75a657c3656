"""Whole-process timing: one fresh Python process doing EAP-IG end to end, JAX or eager torch.

    python -m benchmarks.whole_process --impl=jax --checkpoint=DIR --n=32 [--steps=5]
    python -m benchmarks.whole_process --impl=torch --checkpoint=DIR --n=32
    python -m benchmarks.whole_process --impl=transformer-lens --checkpoint=DIR --n=32

Run each in its own subprocess (`benchmarks.run --suite=whole_process` does that) so that imports,
model loading, tokenisation, compilation and the attribution itself are all counted. Prints one JSON
line with the phase times (seconds since the process started, and per phase). The checkpoint is a HF
GPT-2 directory written beforehand by `common.gpt2_checkpoint` (its creation is not timed: all
implementations read the same files). `transformer-lens` is the `eap` package's algorithm on
TransformerLens hooks (`benchmarks/tl_baseline.py`; needs `pip install transformer-lens==3.9.0`).

Each implementation's imports (jax and jaxinterp, or torch, transformers and TransformerLens) are
made inside its `run_*` function on purpose: they are the "import" phase this benchmark times, and
no implementation's process imports another's libraries. `benchmarks.common` imports jax and
jaxinterp's data loaders, so every implementation's import phase includes those (the torch
processes tokenise the same examples with them).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.DEFINE_string("impl", "jax", "jax | torch | torch-full-logits (the eap package's "
                            "way: full-vocabulary logits at every position) | transformer-lens "
                            "(the eap package's algorithm on TransformerLens hooks)")
_CKPT = flags.DEFINE_string("checkpoint", None, "HF GPT-2 checkpoint directory")
_N = flags.DEFINE_integer("n", 32, "number of IOI examples")
_STEPS = flags.DEFINE_integer("steps", 5, "integrated-gradient steps m")
_BATCH = flags.DEFINE_integer("batch_size", 16, "examples per batch")
_SEQ = flags.DEFINE_integer("seq", 16, "prompt length of the random fallback data")
_CACHE = flags.DEFINE_string("compilation_cache", "", "--impl=jax: turn on JAX's persistent "
                             "compilation cache in this directory "
                             "(`jaxinterp.runtime.compilation_cache`, timed with the imports); "
                             "empty: off, every kernel compiled")
_TASK = flags.DEFINE_enum("task", "ioi", ["ioi", "induction"], "ioi: the first --n IOI examples "
                          "(random pairs without ../shared or a GPT-2 vocabulary); induction "
                          "(--impl=jax): generated as find_circuit generates them for any model "
                          "but the bundled toy (length 8, seed 0, the config's BOS)")


def _phase(phases: dict, name: str, t0: float) -> float:
  t = time.perf_counter()
  phases[name] = t - t0
  return t


def run_jax(ckpt: str, n: int, steps: int, batch_size: int, seq: int, task: str = "ioi") -> dict:
  phases = {}
  t = time.perf_counter()
  import jax
  import numpy as np

  from benchmarks import common
  from jaxinterp import tasks
  from jaxinterp.attribution import attribute
  from jaxinterp.models.pretrained import from_pretrained
  if _CACHE.value:
    from jaxinterp.runtime import compilation_cache
    compilation_cache.enable(_CACHE.value)
  t = _phase(phases, "import", t)
  model = from_pretrained(ckpt)
  jax.block_until_ready(model.params)
  t = _phase(phases, "load_model", t)
  if task == "induction":
    c = model.cfg  # find_circuit's BOS (jaxinterp.runtime.inputs.bos_id): BOS, else EOS, else 0
    bos = c.bos_token_id if c.bos_token_id is not None else (
        c.eos_token_id if c.eos_token_id is not None else 0)
    ds = tasks.make_induction(n, 8, model.cfg.d_vocab, seed=0, bos_id=bos)
    source = "induction (generated: length 8, seed 0)"
  else:
    ds, source = common.ioi_or_random(n, model.cfg.d_vocab, seq)
  t = _phase(phases, "load_data", t)
  scores = attribute(model.cfg, model.params, ds, method="EAP-IG-inputs", ig_steps=steps,
                     batch_size=batch_size, quiet=True).scores
  t = _phase(phases, "attribute", t)
  return dict(phases=phases, data=source, n_examples=len(ds),
              scores_abs_sum=float(np.abs(scores).sum()),
              compilation_cache="on" if _CACHE.value else "off")


def run_torch(ckpt: str, n: int, steps: int, batch_size: int, seq: int,
              full_logits: bool = False) -> dict:
  phases = {}
  t = time.perf_counter()
  import torch
  import transformers

  from benchmarks import common
  from benchmarks.torch_baseline import torch_eap_ig_inputs
  t = _phase(phases, "import", t)
  model = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
  t = _phase(phases, "load_model", t)
  # The same tokenised examples as the JAX run (our loader; tokenisation is cheap either way).
  ds, source = common.ioi_or_random(n, model.config.vocab_size, seq)
  tensors = common.torch_batch(ds)
  t = _phase(phases, "load_data", t)
  scores = torch_eap_ig_inputs(model, *tensors, steps=steps, batch_size=batch_size,
                               full_logits=full_logits)
  t = _phase(phases, "attribute", t)
  return dict(phases=phases, data=source, n_examples=len(ds),
              scores_abs_sum=float(scores.abs().sum()), torch_threads=torch.get_num_threads())


def run_transformer_lens(ckpt: str, n: int, steps: int, batch_size: int, seq: int) -> dict:
  phases = {}
  t = time.perf_counter()
  import torch
  import transformer_lens  # noqa: F401  (timed here, not on first use)
  import transformers

  from benchmarks import common
  from benchmarks.tl_baseline import hooked_from_hf, tl_eap_ig_inputs
  t = _phase(phases, "import", t)
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
  model = hooked_from_hf(hf_model)  # HF weights converted into a HookedTransformer
  del hf_model
  t = _phase(phases, "load_model", t)
  ds, source = common.ioi_or_random(n, model.cfg.d_vocab, seq)
  tensors = common.torch_batch(ds)
  t = _phase(phases, "load_data", t)
  scores = tl_eap_ig_inputs(model, *tensors, steps=steps, batch_size=batch_size)
  t = _phase(phases, "attribute", t)
  return dict(phases=phases, data=source, n_examples=len(ds),
              scores_abs_sum=float(scores.abs().sum()), torch_threads=torch.get_num_threads(),
              transformer_lens_version=common.dist_version("transformer-lens"))


def main(argv):
  del argv
  if not _CKPT.value:
    sys.exit("--checkpoint is required")
  if _TASK.value != "ioi" and FLAGS.value != "jax":
    sys.exit(f"--task={_TASK.value} needs --impl=jax")
  fn = {"jax": lambda *a: run_jax(*a, task=_TASK.value), "torch": run_torch,
        "torch-full-logits": lambda *a: run_torch(*a, full_logits=True),
        "transformer-lens": run_transformer_lens}.get(FLAGS.value)
  if fn is None:
    sys.exit(f"--impl must be jax, torch, torch-full-logits or transformer-lens, "
             f"got {FLAGS.value!r}")
  out = fn(_CKPT.value, _N.value, _STEPS.value, _BATCH.value, _SEQ.value)
  out["impl"] = FLAGS.value
  out["python_start_to_end_s"] = time.perf_counter() - T_START
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  app.run(main)
