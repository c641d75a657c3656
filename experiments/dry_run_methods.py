"""`--dry_run` of find_circuit, evaluate_circuit, activation_patching and train_das: their
kernels' memory plans (`jaxinterp.runtime.memory_programs`), set up and printed by `dry_run`.
"""

from __future__ import annotations

from jaxinterp import attribution as A
from jaxinterp.experiments import dry_run
from jaxinterp.runtime import memory_plan as MP
from jaxinterp.runtime import memory_programs as PR


def _edge_kernel(method: str) -> A.eap.EdgeKernel | None:
  """The EAP-family kernel --method runs at --level=edge (its alphas and what its steps
  interpolate: `eap.EdgeKernel`), or None for a method that runs another."""
  kernel = A.METHODS[method].compile_batch if method in A.METHODS else None
  return kernel if isinstance(kernel, A.eap.EdgeKernel) else None


def find_circuit(model: str, dtype: str | None, method: str, options: dict, batch: int,
                 mesh: str | None) -> MP.Plan:
  """find_circuit's plan: the attribution kernel of --method (EAP family, EAP-IG-activations or
  exact, edge level)."""
  cfg, dt, m, seq, memory = dry_run.setup(model, dtype, mesh, batch)
  kernel = _edge_kernel(method)
  if (options.get("level") or "edge") != "edge" or (kernel is None and method != "exact"):
    family = [m for m in A.METHODS if _edge_kernel(m)]
    raise MP.PlanError(f"--dry_run plans --method={method} at --level=edge for "
                       f"{', '.join(family)} and exact only")
  if method == "exact":
    chunk = options.get("exact_chunk")
    return dry_run.show("exact", lambda p: PR.exact(cfg, p, seq, m, memory, chunk),
                        cfg, dt, m, seq, memory, batch, notes=(
                            "exact: clean run, upstream cache and one vmapped chunk of edges into "
                            "layer 0 (the largest), compiled as one program (the scanned blocks "
                            "when they fit, as the run does)",))
  try:
    opts = A.make_options(A.get_method(method), None, **options)
  except A.AttributionError as e:
    raise MP.PlanError(f"--method={method}: {e}") from None
  alphas, interpolate = kernel.alphas_of(opts), kernel.interpolate
  budget = getattr(opts, "memory_budget", None)
  return dry_run.show(f"{method} (m={len(alphas)})",
                      lambda p: PR.eap(cfg, p, seq, alphas, m, memory, budget, opts.remat,
                                       interpolate),
                      cfg, dt, m, seq, memory, batch, notes=lambda p: PR.eap_notes(
                          cfg, p, seq, len(alphas), batch, budget, opts.remat, method, m,
                          interpolate))


def simple(kind: str, model: str, dtype: str | None, batch: int, mesh: str | None = None,
           **kw) -> MP.Plan:
  """The plan of `evaluate_circuit` ("circuit"), `activation_patching` ("patching", with
  `sweeps` and `chunk`) or `train_das` ("train")."""
  cfg, dt, m, seq, memory = dry_run.setup(model, dtype, mesh, batch)
  if kind == "circuit":
    return dry_run.show("circuit forward", lambda p: PR.circuit(cfg, p, seq, m), cfg, dt, m, seq,
                        memory, batch)
  if kind == "train":
    return dry_run.show("training step (AdamW)", lambda p: PR.train(cfg, p, seq, m), cfg, dt, m,
                        seq, memory, batch)
  plans = [dry_run.show(f"activation patching, sweep {s}",
                        lambda p, s=s: PR.patching(cfg, p, seq, s, kw["chunk"], m), cfg, dt, m, seq,
                        memory, batch) for s in kw["sweeps"].split(",") if s]
  return max(plans, key=lambda p: p.at.peak)


