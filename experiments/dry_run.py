"""`--dry_run`: the binaries' memory plans (`jaxinterp.runtime.memory_plan`), printed, nothing run.

A binary defines the flags with `for f in dry_run.FLAGS: cli.define(*f)` (so they are listed in
its own `--help`) and, first thing in its run, `if dry_run.requested(): return dry_run.plan(...)`.
The plan reads only the model's config (a preset name such as `llama-3.1-8b`, or a directory's
`config.json`), compiles the binary's kernels on abstract arrays and prints the per-device figures;
it loads no weights and writes nothing (no --out, no compilation cache). Here: the flags, the
plan's setup and report, and attribution_graph's plan; the attribution, patching, circuit and
training kernels' plans are in `dry_run_methods` (so attribution_graph never imports them).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxinterp.experiments import cli
from jaxinterp.runtime import inputs
from jaxinterp.runtime import memory_plan as MP
from jaxinterp.transcoders import memory_programs as GP
from jaxinterp.transcoders import toy as toy_transcoders

FLAGS = (
    ("bool", "dry_run", False, "Print a memory plan instead of running: per device, parameter "
     "bytes, the peak of the compiled kernels at --batch_size, and the largest batch that fits "
     "--device_memory. Reads only the model's config (or a preset: " + ", ".join(MP.PRESETS) +
     "); loads no weights, writes nothing."),
    ("string", "device_memory", "80GB", "--dry_run: memory of one device (80GB, 80GiB, 512MB)."),
    ("integer", "seq_len", 128, "--dry_run: tokens per prompt (BOS included) to plan for."),
)
def _resolve(name: str) -> str:
  """The bundled models' names (`toy`, `toy_mlp`) to their directories."""
  if name == toy_transcoders.TOY_MLP:
    return toy_transcoders.TOY_MLP_DIR
  return inputs.resolve_model_path(name)


def requested() -> bool:
  """Whether `--dry_run` was given."""
  return bool(cli.value("dry_run", False))


def _fsdp() -> bool:
  """--fsdp, in the binaries that have it (find_circuit)."""
  return "fsdp" in cli.FLAGS and bool(cli.value("fsdp", False))


def setup(model: str, dtype: str | None, mesh: str | None, batch: int | None):
  """The plan's inputs from the flags: (model config, dtype, mesh, --seq_len, --device_memory in
  bytes); `MP.PlanError` (one line) for bad ones."""
  seq = cli.value("seq_len", 128)
  if seq < 2:
    raise MP.PlanError(f"--seq_len must be at least 2 (BOS and one token), got {seq}")
  if batch is not None and batch < 1:
    raise MP.PlanError(f"--batch_size must be positive, got {batch}")
  memory = MP.parse_bytes(cli.value("device_memory", "80GB"))
  cfg, dt = MP.model_config(model, dtype, _resolve)
  m = MP.parse_mesh(mesh)
  if _fsdp() and m is None:
    raise MP.PlanError("--fsdp shards the weights over a --mesh's DATA axis; give --mesh")
  return cfg, dt, m, seq, memory


def show(what: str, build_fn, cfg, dt, m, seq, memory, batch, unit="examples",
         notes=()) -> MP.Plan:
  """Plan the program `build_fn(abstract params)` builds at `batch` and print the report."""
  params = MP.abstract_params(cfg, dt, m, fsdp=_fsdp())
  build = build_fn(params)
  shape = f"{batch} rows of a {seq}-token prompt" if unit == "rows" else \
      f"batch {batch} x {seq} tokens"
  head = (f"{what}, {cfg.family} ({cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"{jnp.dtype(dt).name}), {shape}, {MP.describe_mesh(m)}"
          f"{', weights FSDP over data' if _fsdp() else ''}")
  if callable(notes):  # notes of the abstract parameters
    notes = notes(params)
  plan = MP.make_plan(head, build, batch, MP.per_device_bytes(params), m, memory, unit, notes)
  print(MP.report(plan), flush=True)
  return plan


def attribution_graph(model: str, dtype: str | None, batch: int, n_features: int,
                      max_feature_nodes: int | None, n_logits: int) -> MP.Plan:
  """attribution_graph's plan: one batch of `batch` VJP rows over `n_features`-feature
  transcoders at every layer, for a --seq_len-token prompt, and the host arrays."""
  cfg, dt, m, seq, memory = setup(model, dtype, None, batch)
  act = GP.n_active(cfg, seq)
  host = GP.graph_host_bytes(cfg, seq, max_feature_nodes, n_logits)
  return show(f"attribution graph rows ({n_features} features per layer)",
                lambda p: GP.graph(cfg, p, seq, n_features, dt), cfg, dt, m, seq, memory, batch,
                unit="rows", notes=(
                    f"assumed {GP.ACTIVE_PER_TOKEN_LAYER} active features per layer and token: "
                    f"{act} in all (the graph's width)",
                    f"host: {MP.fmt_bytes(host)} for the dense rows and the adjacency",))
