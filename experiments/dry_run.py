"""`--dry_run`: the binaries' memory plans (`jaxinterp.runtime.memory_plan`), printed, nothing run.

A binary defines the flags with `for f in dry_run.FLAGS: cli.define(*f)` (so they are listed in
its own `--help`) and, first thing in its run, `if dry_run.requested(): return dry_run.plan(...)`.
The plan reads only the model's config (a preset name such as `llama-3.1-8b`, or a directory's
`config.json`), compiles the binary's kernels on abstract arrays and prints the per-device figures;
it loads no weights and writes nothing (no --out, no compilation cache).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxinterp.experiments import cli
from jaxinterp.runtime import inputs
from jaxinterp.runtime import memory_plan as MP
from jaxinterp.transcoders import toy as toy_transcoders

FLAGS = (
    ("bool", "dry_run", False, "Print a memory plan instead of running: per device, parameter "
     "bytes, the peak of the compiled kernels at --batch_size, and the largest batch that fits "
     "--device_memory. Reads only the model's config (or a preset: " + ", ".join(MP.PRESETS) +
     "); loads no weights, writes nothing."),
    ("string", "device_memory", "80GB", "--dry_run: memory of one device (80GB, 80GiB, 512MB)."),
    ("integer", "seq_len", 128, "--dry_run: tokens per prompt (BOS included) to plan for."),
)
# The EAP family's alphas (as `attribution.eap` sets them for edges) from the method's options.
EAP_FAMILY = {"EAP": lambda o: [1.0], "clean-corrupted": lambda o: [0.0, 1.0],
              "EAP-IG-inputs": lambda o: o.alphas(eap_start=0)}
OWN_KERNELS = ("EAP-IG-activations", "exact")  # not ig_inputs_batch


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


def _setup(model: str, dtype: str | None, mesh: str | None, batch: int | None):
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


def _print(what: str, build_fn, cfg, dt, m, seq, memory, batch, unit="examples",
           notes=()) -> MP.Plan:
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


def find_circuit(model: str, dtype: str | None, method: str, options: dict, batch: int,
                 mesh: str | None) -> MP.Plan:
  """find_circuit's plan: the attribution kernel of --method (EAP family, EAP-IG-activations or
  exact, edge level)."""
  from jaxinterp import attribution as A
  from jaxinterp.runtime import memory_programs as PR  # imported on use: 0.2 s of every start
  cfg, dt, m, seq, memory = _setup(model, dtype, mesh, batch)
  if (options.get("level") or "edge") != "edge" or method not in (*EAP_FAMILY, *OWN_KERNELS):
    raise MP.PlanError(f"--dry_run plans --method={method} at --level=edge for "
                       f"{', '.join((*EAP_FAMILY, *OWN_KERNELS[:-1]))} and exact only")
  if method == "exact":
    return _print("exact", lambda p: PR.exact(cfg, p, seq, m, memory, options.get("exact_chunk")),
                  cfg, dt, m, seq, memory, batch, notes=(
                      "exact: clean run, upstream cache and one vmapped chunk of edges into layer "
                      "0 (the largest), compiled as one program (the scanned blocks when they "
                      "fit, as the run does)",))
  try:
    opts = A.make_options(A.get_method(method), None, **options)
  except A.AttributionError as e:
    raise MP.PlanError(f"--method={method}: {e}") from None
  if method == "EAP-IG-activations":
    return _activations(cfg, dt, m, seq, memory, batch, opts)
  alphas, budget = EAP_FAMILY[method](opts), getattr(opts, "memory_budget", None)
  return _print(f"{method} (m={len(alphas)})",
                lambda p: PR.eap(cfg, p, seq, alphas, m, memory, budget, opts.remat),
                cfg, dt, m, seq, memory, batch, notes=lambda p: PR.eap_notes(
                    cfg, p, seq, len(alphas), batch, budget, opts.remat, method))


def _activations(cfg, dt, m, seq, memory, batch, opts) -> MP.Plan:
  """EAP-IG-activations' plan: its own kernel, with --remat and --memory_budget's row groups."""
  from jaxinterp.runtime import memory_programs as PR  # imported on use: 0.2 s of every start
  alphas, budget = opts.alphas(eap_start=1), opts.memory_budget
  return _print(f"EAP-IG-activations (m={len(alphas)})",
                lambda p: PR.activations(cfg, p, seq, alphas, m, budget, opts.remat),
                cfg, dt, m, seq, memory, batch, notes=lambda p: PR.activations_notes(
                    cfg, p, seq, len(alphas), batch, budget, opts.remat))


def simple(kind: str, model: str, dtype: str | None, batch: int, mesh: str | None = None,
           **kw) -> MP.Plan:
  """The plan of `evaluate_circuit` ("circuit"), `activation_patching` ("patching", with
  `sweeps` and `chunk`) or `train_das` ("train")."""
  from jaxinterp.runtime import memory_programs as PR  # imported on use: 0.2 s of every start
  cfg, dt, m, seq, memory = _setup(model, dtype, mesh, batch)
  if kind == "circuit":
    return _print("circuit forward", lambda p: PR.circuit(cfg, p, seq, m), cfg, dt, m, seq,
                  memory, batch)
  if kind == "train":
    return _print("training step (AdamW)", lambda p: PR.train(cfg, p, seq, m), cfg, dt, m, seq,
                  memory, batch)
  plans = [_print(f"activation patching, sweep {s}",
                  lambda p, s=s: PR.patching(cfg, p, seq, s, kw["chunk"], m), cfg, dt, m, seq,
                  memory, batch) for s in kw["sweeps"].split(",") if s]
  return max(plans, key=lambda p: p.at.peak)


def attribution_graph(model: str, dtype: str | None, batch: int, n_features: int,
                      max_feature_nodes: int | None, n_logits: int) -> MP.Plan:
  """attribution_graph's plan: one batch of `batch` VJP rows over `n_features`-feature
  transcoders at every layer, for a --seq_len-token prompt, and the host arrays."""
  from jaxinterp.runtime import memory_programs as PR  # imported on use: 0.2 s of every start
  cfg, dt, m, seq, memory = _setup(model, dtype, None, batch)
  act = PR.n_active(cfg, seq)
  host = PR.graph_host_bytes(cfg, seq, max_feature_nodes, n_logits)
  return _print(f"attribution graph rows ({n_features} features per layer)",
                lambda p: PR.graph(cfg, p, seq, n_features, dt), cfg, dt, m, seq, memory, batch,
                unit="rows", notes=(
                    f"assumed {PR.ACTIVE_PER_TOKEN_LAYER} active features per layer and token: "
                    f"{act} in all (the graph's width)",
                    f"host: {MP.fmt_bytes(host)} for the dense rows and the adjacency",))
