"""How hard XLA optimises a kernel, by model size: `jit`, a `jax.jit` that decides per model.

On a CPU, compiling a kernel is mostly XLA:CPU generating and optimising LLVM code for each of its
fused loops: seconds for the EAP-IG kernel even of a 2-layer toy model, whose arithmetic then runs
in milliseconds. For models that small (`SMALL_MODEL_PARAMS`: the bundled toy, the tests' models,
the ground-truth models) `jit` compiles with `FAST_COMPILE`, which cuts the toy EAP-IG kernel's
compile about 2.5x; larger models keep XLA's full optimisation, where the code's speed matters
and the compile is a small part of the run. Measured on this repository's 2-core CPU (docs/
performance.md, "Compile time"): the outputs of the kernels that use it (EAP/EAP-IG-inputs, node
and neuron attribution, IFR, exact, ACDC, the circuit forward) were bitwise equal to the fully
optimised ones on the toy (the same fusions and order of floating-point operations; only LLVM's
work on the generated loops is lighter), and the toy's attribute and curve phases ran as fast.
A kernel joins only once that is checked. EAP-IG-activations, which runs on the EAP-IG kernel
(`interpolate="activations"`), is the exception that comes with it: under the policy 259 of its
1,188 toy scores (4 batches) moved, by up to 7e-7 of the largest score.

    @functools.partial(compile_policy.jit, static_argnames=("cfg", "task"))
    def kernel(cfg, task, params, batch): ...

The model config is the kernel's first argument (or its `cfg=` keyword). `compiler_options(cfg)`
is the one decision. It is opt-in: `$JAXINTERP_COMPILE_POLICY=fast` turns it on, and by default
everything compiles fully optimised (see `ENV`). An XLA_FLAGS that sets either option itself (as
the fast test suite's `--xla_backend_optimization_level=0`) is left to decide. Only the CPU backend
is affected.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax

# "full" (the default: XLA's own optimisation everywhere) or "fast": FAST_COMPILE for small models.
# Opt-in: on the final tree exact's and ACDC's toy scores moved by up to 5e-5 relative under it, and
# a slow-suite process compiling these tiny models with it segfaulted inside XLA:CPU twice.
ENV = "JAXINTERP_COMPILE_POLICY"
# At most this many parameters (embeddings included): compiled with FAST_COMPILE on CPU. The toy
# has 0.18 M parameters; GPT-2 small 124 M (there FAST_COMPILE cut the EAP-IG kernel's compile by
# a quarter but ran it a quarter slower).
SMALL_MODEL_PARAMS = 1_000_000
# XLA:CPU's LLVM optimisation level 1 (of 3; default 2, as -O2) and its older loop emitter for
# fusions (the default "fusion emitters" compile through MLIR, several times slower on a toy).
FAST_COMPILE = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}


def n_params(cfg) -> int:
  """Parameters of a transformer of config `cfg` (the blocks' matrices and the embeddings)."""
  d, heads, kv = cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
  mlp = d * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
  return cfg.n_layers * (d * cfg.d_head * (2 * heads + 2 * kv) + mlp) + 2 * cfg.d_vocab * d


def _user_flags() -> bool:
  flags = os.environ.get("XLA_FLAGS", "")
  return any(k in flags for k in FAST_COMPILE)


def compiler_options(cfg) -> dict[str, Any] | None:
  """The XLA compiler options to compile a kernel of a model with config `cfg` with: FAST_COMPILE
  for a model of at most SMALL_MODEL_PARAMS parameters on the CPU backend, else None (XLA's
  defaults), when $JAXINTERP_COMPILE_POLICY=fast; None otherwise (the default), or under an
  XLA_FLAGS setting either option."""
  if (cfg is None or os.environ.get(ENV, "full") != "fast" or _user_flags()
      or jax.default_backend() != "cpu"):
    return None
  return FAST_COMPILE if n_params(cfg) <= SMALL_MODEL_PARAMS else None


class _PolicyJit:
  """`jax.jit(fun)` twice, with and without FAST_COMPILE; each call takes the one
  `compiler_options` picks for its config, or, called with traced arguments (inside another jit or
  `eval_shape`), the one without options. `trace` and `lower` as `jax.jit`'s."""

  def __init__(self, fun, jit_kwargs: dict):
    self._full = jax.jit(fun, **jit_kwargs)
    self._fast = jax.jit(fun, compiler_options=FAST_COMPILE, **jit_kwargs)
    functools.update_wrapper(self, fun)

  def _pick(self, args, kwargs):
    # Called inside another trace (a kernel's jit, eval_shape, grad): it is inlined, and the
    # outermost jit's options apply (jax refuses compiler_options on a nested jit).
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
      return self._full
    cfg = kwargs["cfg"] if "cfg" in kwargs else args[0] if args else None
    return self._full if compiler_options(cfg) is None else self._fast

  def __call__(self, *args, **kwargs):
    return self._pick(args, kwargs)(*args, **kwargs)

  def trace(self, *args, **kwargs):
    """`jax.jit(...).trace` of the program this call would compile."""
    return self._pick(args, kwargs).trace(*args, **kwargs)

  def lower(self, *args, **kwargs):
    """`jax.jit(...).lower` of the program this call would compile."""
    return self._pick(args, kwargs).lower(*args, **kwargs)


def jit(fun=None, /, **jit_kwargs):
  """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options(cfg)`, cfg being the first
  argument of each call (or its `cfg=` keyword). Usable as a decorator with keywords."""
  if fun is None:
    return functools.partial(jit, **jit_kwargs)
  return _PolicyJit(fun, jit_kwargs)
