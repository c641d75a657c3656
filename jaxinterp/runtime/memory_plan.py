"""Memory plans before a run (`--dry_run`): per-device bytes of a binary's kernels, no weights.

A plan builds the kernels a run would compile on abstract arrays: the parameters are
`jax.eval_shape` of the model config (from a preset, a HF `config.json` or our conversion's config;
no weight is read), the batch is `jax.ShapeDtypeStruct`s of the given batch and sequence length,
and with a `--mesh` both carry `runtime.sharding`'s shardings. Each kernel is then
`jit(...).lower(...).compile().memory_analysis()`: XLA's own buffer assignment, per device,
of arguments (parameters, batch, the kernel's inputs), outputs and temporaries. Nothing runs.

What a plan reports, per device:
- parameter bytes (on a mesh, the shard the device holds);
- peak bytes: arguments + outputs + temporaries of the program, minus aliased bytes;
- the largest batch that fits `device_memory`: the program is compiled at batch b and 2b, and the
  peak taken as linear in the batch (parameters and fixed buffers + bytes per row). It is an
  extrapolation, exact for the kernels here up to XLA's choices of buffer reuse; rerun the dry run
  at that batch to see its compiled figure.

The compiled figures are XLA:CPU's when planned on a CPU (as the docs' tables are): every buffer
the program allocates. A GPU compile schedules and fuses differently, and XLA:CPU multiplies bf16
matrices in float32, materialising float32 copies of bf16 weights that a GPU does not (docs/
performance.md, "Memory plans"). `tests/runtime/test_memory_plan.py` checks the CPU figure against
the resident memory a run of the kernel takes. Runs that stream over many kernels (exact patching's
edge chunks, the attribution graph's row batches) are planned as one composed program of their
largest step, returning what the run keeps alive across the steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinterp.models import transformer as T
from jaxinterp.models.config import ConfigError, ModelConfig
from jaxinterp.models.convert import CheckpointError, config_from_hf
from jaxinterp.models.pretrained import CONVERTED_CONFIG
from jaxinterp.runtime import inputs, sharding, sizes
from jaxinterp.runtime.sizes import fmt_bytes
from jaxinterp.tasks import Batch


class PlanError(inputs.InputError):
  """Bad input to a memory plan (a size, a model, a mesh): one line naming the flag."""


# HF config.json fields of the models the docs' tables plan (as on the Hub; only the fields the
# config translation reads). `--model=NAME` takes these without a download.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=128000,
        eos_token_id=128001, torch_dtype="bfloat16"),
    "gemma-2-2b": dict(
        model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
        num_key_value_heads=4, num_hidden_layers=26, vocab_size=256000, head_dim=256,
        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", bos_token_id=2,
        eos_token_id=1, pad_token_id=0, torch_dtype="float32"),
    "gemma-2-9b": dict(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
        num_key_value_heads=8, num_hidden_layers=42, vocab_size=256000, head_dim=256,
        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", bos_token_id=2,
        eos_token_id=1, pad_token_id=0, torch_dtype="float32"),
    "gemma-3-27b": dict(
        model_type="gemma3_text", hidden_size=5376, intermediate_size=21504,
        num_attention_heads=32, num_key_value_heads=16, num_hidden_layers=62, vocab_size=262208,
        head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, rope_scaling=dict(factor=8.0, rope_type="linear"),
        query_pre_attn_scalar=168, sliding_window=1024, sliding_window_pattern=6,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0,
        torch_dtype="bfloat16"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_bytes(text: str, flag: str = "device_memory") -> int:
  """Bytes of a size such as `80GB` (10^9), `80GiB` (2^30), `512MB`, `8e10`; PlanError else."""
  try:
    return sizes.parse_bytes(text, flag)
  except sizes.SizeError as e:
    raise PlanError(str(e)) from None


def model_config(model: str, dtype: str | None = None,
                 resolve: Callable[[str], str] = lambda m: m) -> tuple[ModelConfig, Any]:
  """(config, parameter dtype) of `--model` without reading weights: a PRESETS name, or a directory
  holding a HF `config.json` or our conversion's config (`resolve` maps names such as `toy` to
  their directory). The dtype is `dtype` if given, else the config's `torch_dtype` (float32 if
  absent)."""
  if model.lower() in PRESETS:
    return _from_hf(model, PRESETS[model.lower()], dtype)
  path = resolve(model)
  conv, plain = os.path.join(path, CONVERTED_CONFIG), os.path.join(path, "config.json")
  found = conv if os.path.exists(conv) else plain if os.path.exists(plain) else None
  if not os.path.isdir(path) or found is None:
    raise PlanError(f"--model={model}: not a preset ({', '.join(PRESETS)}) nor a directory "
                    f"holding config.json")
  try:
    with open(found) as f:
      fields = json.load(f)
    if found == conv:  # our conversion: ModelConfig's own fields (float32 params)
      return ModelConfig.from_dict(fields), DTYPES[dtype or "float32"]
  except (OSError, ValueError, TypeError) as e:
    raise PlanError(f"--model={model}: cannot read {found}: {e}") from None
  return _from_hf(model, fields, dtype)


def _from_hf(model: str, hf: dict[str, Any], dtype: str | None) -> tuple[ModelConfig, Any]:
  try:
    cfg = config_from_hf(hf)
  except (CheckpointError, ConfigError) as e:
    raise PlanError(f"--model={model}: {e}") from None
  own = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  return cfg, DTYPES.get(dtype or own, jnp.float32)


def parse_mesh(text: str | None) -> jax.sharding.Mesh | None:
  """The ("data", "model") mesh of `--mesh=DATAxMODEL` over the visible devices (None if empty);
  PlanError for a malformed mesh or one larger than the devices present."""
  if not text:
    return None
  try:
    n_data, n_model = (int(x) for x in text.lower().split("x"))
    return sharding.make_mesh(n_data, n_model)
  except (ValueError, sharding.ShardingError) as e:
    raise PlanError(f"--mesh={text}: {e} (expected DATAxMODEL, e.g. 2x4)") from None


def _put(x, mesh, spec):
  """x's shape and dtype as a ShapeDtypeStruct, placed on `mesh` by `spec` (if a mesh)."""
  sh = None if mesh is None else NamedSharding(mesh, spec)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)


def abstract_params(cfg: ModelConfig, dtype, mesh=None, fsdp: bool = False):
  """The parameters as `ShapeDtypeStruct`s (sharded as `sharding.shard_params(..., fsdp)` places
  them)."""
  shapes = jax.eval_shape(lambda: T.init_params(cfg, jax.random.PRNGKey(0), dtype))
  n_model = 1 if mesh is None else mesh.shape[sharding.MODEL]
  n_data = mesh.shape[sharding.DATA] if mesh is not None and fsdp else 1
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _put(x, mesh, sharding.param_spec(path, x, n_model, n_data)), shapes)


def abstract_batch(batch_size: int, seq_len: int, mesh=None) -> Batch:
  """A `Batch` of ShapeDtypeStructs (labels: one correct and one incorrect id per row, as the
  logit-difference tasks read), its rows on the mesh's "data" axis."""
  def a(shape, dtype):  # rows on "data"
    return _put(jax.ShapeDtypeStruct(shape, dtype), mesh,
                P(sharding.DATA, *([None] * (len(shape) - 1))))
  b, p = batch_size, seq_len
  return Batch(clean=a((b, p), jnp.int32), corrupted=a((b, p), jnp.int32), mask=a((b, p), bool),
               last=a((b,), jnp.int32),
               labels={"correct": a((b,), jnp.int32), "incorrect": a((b,), jnp.int32)},
               valid=a((b,), bool))


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of (sharded) ShapeDtypeStructs or arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.shape
    sh = getattr(x, "sharding", None)
    if sh is not None:
      shape = sh.shard_shape(shape)
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return int(total)


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One compiled program's per-device memory (`memory_analysis`), in bytes."""

  argument: int
  output: int
  temp: int
  alias: int

  @property
  def peak(self) -> int:
    """Arguments + outputs + temporaries, aliased (donated) bytes counted once."""
    return self.argument + self.output + self.temp - self.alias


def compile_memory(fn: Callable, *args) -> Compiled:
  """`jax.jit(fn).lower(*args).compile().memory_analysis()` as a `Compiled`."""
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  return Compiled(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                  int(m.temp_size_in_bytes), int(m.alias_size_in_bytes))


# A program of a batch size: (function to jit, its abstract arguments).
Builder = Callable[[int], tuple[Callable, tuple]]


@dataclasses.dataclass(frozen=True)
class Plan:
  """A memory plan, per device. `at` the planned batch, `at2` twice it (the slope's second point).

  Attributes:
    what: one line: the program, the model, batch x sequence length, the mesh.
    devices: devices of the mesh (1 without one).
    params: parameter bytes per device.
    batch: the batch planned (`unit`s: examples, or graph rows).
    at, at2: the compiled program at `batch` and at 2 * `batch`.
    device_memory: bytes of one device, or None.
    step: the batch granularity (the mesh's data axis).
    notes: lines printed under the figures (assumptions of this plan).
  """

  what: str
  devices: int
  params: int
  batch: int
  at: Compiled
  at2: Compiled
  device_memory: int | None
  step: int = 1
  unit: str = "examples"
  notes: tuple[str, ...] = ()

  @property
  def per_row(self) -> float:
    """Peak bytes per extra batch row (from the two compiles)."""
    return max(0.0, (self.at2.peak - self.at.peak) / self.batch)

  @property
  def fixed(self) -> float:
    """Peak bytes at batch 0 by the same line: parameters and batch-independent buffers."""
    return self.at.peak - self.per_row * self.batch

  @property
  def max_batch(self) -> int | None:
    """The largest batch (a multiple of `step`) whose extrapolated peak fits device_memory: None
    without a device memory, -1 when the peak does not grow with the batch and fits."""
    if self.device_memory is None:
      return None
    if self.per_row <= 0:
      return None if self.fixed > self.device_memory else -1
    n = int((self.device_memory - self.fixed) // self.per_row)
    return max(0, n - n % self.step)

  @property
  def fits(self) -> bool | None:
    """Whether the planned batch's peak fits device_memory (None without one)."""
    return None if self.device_memory is None else self.at.peak <= self.device_memory


def make_plan(what: str, build: Builder, batch: int, params: int, mesh=None,
              device_memory: int | None = None, unit: str = "examples",
              notes: tuple[str, ...] = ()) -> Plan:
  """Compile `build(batch)` and `build(2 * batch)` and return their `Plan`."""
  step = 1 if mesh is None else mesh.shape[sharding.DATA]
  if batch % step:
    raise PlanError(f"--batch_size={batch} must be a multiple of the mesh's data axis ({step})")
  at = compile_memory(*_unpack(build(batch)))
  at2 = compile_memory(*_unpack(build(2 * batch)))
  return Plan(what, 1 if mesh is None else mesh.size, params, batch, at, at2, device_memory,
              step, unit, notes)


def _unpack(built):
  fn, args = built
  return (fn, *args)


def describe_mesh(mesh) -> str:
  """"one device", or the mesh's shape."""
  return "one device" if mesh is None else (
      f"mesh {mesh.shape[sharding.DATA]}x{mesh.shape[sharding.MODEL]} (data x model), "
      f"per device")


def report(plan: Plan) -> str:
  """The plan as printed by `--dry_run`."""
  a = plan.at
  lines = [f"memory plan (dry run, nothing loaded or written): {plan.what}",
           f"  parameters          {fmt_bytes(plan.params)} per device",
           f"  peak                {fmt_bytes(a.peak)} per device at {plan.batch} {plan.unit} "
           f"(arguments {fmt_bytes(a.argument)}, outputs {fmt_bytes(a.output)}, temporaries "
           f"{fmt_bytes(a.temp)})",
           f"  per extra row       {fmt_bytes(plan.per_row)} (compiled again at {2 * plan.batch}: "
           f"peak {fmt_bytes(plan.at2.peak)})"]
  if plan.device_memory is not None:
    mb = plan.max_batch
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  device memory       {fmt_bytes(plan.device_memory)}: batch {plan.batch} "
                 f"{verdict}")
    if mb == -1:
      lines.append("  largest batch       any (the peak does not grow with the batch)")
    elif mb == 0:
      lines.append(f"  largest batch       none: {fmt_bytes(plan.fixed)} before any row exceeds "
                   f"the device")
    else:
      lines.append(f"  largest batch       {mb} {plan.unit} (extrapolated: peak linear in the "
                   f"batch)")
  lines += [f"  note: {n}" for n in plan.notes]
  return "\n".join(lines)
