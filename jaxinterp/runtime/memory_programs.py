"""The kernels each binary compiles, as `memory_plan` builders: `batch size -> (fn, abstract args)`.

Each builder composes a run's per-batch kernels into one function, as the run calls them, and
returns what the run keeps alive across them as outputs, so the compiled program's peak is the
run's:
- `eap`: EAP, EAP-IG-inputs (m steps), clean-corrupted and EAP-IG-activations (its layer nodes and
  steps in one scan): `receiver_grads.ig_inputs_batch` (in the chunks of a `--memory_budget`, if
  given).
- `exact`: the clean metric, the clean run's upstream cache, and one vmapped chunk of edges into
  layer 0 (those rerun every block: the largest chunk), `exact_chunk_size` edges per call, through
  `edge_chunk_scan` (with the stacked blocks) where the run uses it, else `edge_chunk`.
- `circuit`: `evaluate_circuit`'s circuit forward (`prepare`, then one circuit's metric).
- `patching`: `activation_patching`'s baselines, the source activations and one vmapped chunk
  of patched forwards, for each sweep (the plan is the largest).
- `train`: a training step of the model (forward, backward, AdamW update), as `train_das` trains
  its toy model before DAS.
(attribution_graph's rows: `transcoders.memory_programs`.)

Plans assume a patching ablation without a shared clean/corrupted prefix (every position runs),
the upper bound of what a dataset's prompts cost.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxinterp.attribution import contraction as C
from jaxinterp.attribution import exact as X
from jaxinterp.attribution import memory_budget as MB
from jaxinterp.attribution import receiver_grads as RG
from jaxinterp.attribution.ablation import Patching
from jaxinterp.evaluation import circuit_forward as CF
from jaxinterp.models import edges as E
from jaxinterp.models import transformer as T
from jaxinterp.models.config import ModelConfig
from jaxinterp.patching import sweeps as PT
from jaxinterp.runtime import memory_plan as MP
from jaxinterp.tasks import get_task
from jaxinterp.tasks import metrics as task_metrics

TASK = get_task("ioi")  # a logit difference of one correct and one incorrect id per row
PATCHING = Patching()


def _spec(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def eap(cfg: ModelConfig, params, seq_len: int, alphas, mesh=None,
        device_memory: int | None = None, memory_budget: str | None = None,
        remat: bool = False, interpolate: str = "inputs") -> MP.Builder:
  """EAP-family edge attribution (`alphas`: [1] EAP, k/m IG-inputs, [0, 1] clean-corrupted; with
  `interpolate="activations"`, EAP-IG-activations' k/m), with `remat` and in the row and position
  chunks a `memory_budget` ("2GB", `IGOptions.memory_budget`) sets (`memory_budget.inputs_plan`:
  remat too where only a remat'd row fits), as the run does."""
  alphas = jnp.asarray(alphas, jnp.float32)

  def build(b):
    chunks, rm = {}, remat
    batch = MP.abstract_batch(b, seq_len, mesh)
    shards = C.data_shards_of(batch.clean)
    if memory_budget is not None:
      plan = MB.inputs_plan(cfg, params, (b, seq_len), alphas.shape[0], memory_budget, remat,
                            shards, interpolate)
      chunks = dict(row_chunks=plan.row_chunks, chunk_bytes=plan.chunk_bytes)
      rm = plan.remat
    if shards > 1:  # as `eap.kernel_call`: each device contracts (and groups) its own rows
      chunks["data_shards"] = shards

    def fn(params, batch):
      with _planned_device(device_memory):
        return RG.ig_inputs_batch(cfg, TASK, params, batch, PATCHING, alphas, remat=rm,
                                  interpolate=interpolate, **chunks)
    return fn, (params, batch)
  return build


def _shards(batch: int, seq_len: int, mesh) -> int:
  """The devices a batch's rows are split over on `mesh` (its "data" axis), as the run splits."""
  return C.data_shards_of(MP.abstract_batch(batch, seq_len, mesh).clean)


def eap_notes(cfg: ModelConfig, params, seq_len: int, n_steps: int, batch: int,
              memory_budget: str | None = None, remat: bool = False,
              method: str = "EAP-IG-inputs", mesh=None,
              interpolate: str = "inputs") -> tuple[str, ...]:
  """The lines `--dry_run` prints under an EAP-family plan of `method`, whose steps interpolate
  `interpolate` (as `eap`'s): EAP-IG-activations' number of steps, and with a `memory_budget` the
  groups of rows and whether remat runs (asked for, or chosen by the budget) at `batch` and twice
  it."""
  plans = []
  if memory_budget is not None:
    plans = [MB.inputs_plan(cfg, params, (n, seq_len), n_steps, memory_budget, remat,
                            _shards(n, seq_len, mesh), interpolate) for n in (batch, 2 * batch)]
  lines = []
  if interpolate == "activations":
    lines.append(f"{method}: {1 + 2 * cfg.n_layers} layer nodes x {n_steps} steps, one "
                 f"plain forward and backward each, in one scan")
  if plans:
    lines.append(f"--memory_budget={memory_budget}: the rows in {plans[0].row_chunks} group(s) at "
                 f"batch {batch}, {plans[1].row_chunks} at {2 * batch}, one after another"
                 f"{_remat_words(plans, method)}")
  elif remat:
    lines.append("remat: each block recomputed in the backward (the per-head-input kernel)")
  return tuple(lines)


def _remat_words(plans, method: str) -> str:
  """How the budget's plans run remat, in words."""
  if any(p.auto_remat for p in plans):
    return (f"; {method} runs with --remat: one row fits only rematerialised (chosen by the "
            f"budget, as the run does)")
  return "; with --remat" if plans[0].remat else ""


@contextlib.contextmanager
def _planned_device(device_memory: int | None):
  """While tracing: the blocks run as one scan if their stacked copy fits the planned device
  (`receiver_grads.scan_blocks_fits`, for EAP and exact alike)."""
  planned, RG.PLANNED_DEVICE_BYTES = RG.PLANNED_DEVICE_BYTES, device_memory
  try:
    yield
  finally:
    RG.PLANNED_DEVICE_BYTES = planned


def exact(cfg: ModelConfig, params, seq_len: int, mesh=None,
          device_memory: int | None = None, chunk: int | None = None) -> MP.Builder:
  """Exact edge patching: clean metric, upstream cache, one chunk of edges into layer 0, through
  the kernel `exact._exact_batch` runs there: `edge_chunk_scan` on the stacked blocks when
  `exact.scan_layers` (for the planned device), else `edge_chunk`."""
  n_up = E.n_upstream_of_mlp(cfg, 0)

  def build(b):
    size = chunk or X.exact_chunk_size(cfg, b, seq_len,
                                       None if device_memory is None else device_memory / 4)

    def fn(params, batch, senders, receivers):
      _, _, logits = task_metrics.clean_metric(cfg, TASK, params, batch)
      resids, mlp_inputs, delta, _ = X.upstream_cache(cfg, params, batch, PATCHING, None)
      with _planned_device(device_memory):
        scan = X.scan_layers(cfg, params)
      if scan:  # the stacked copy lives for the whole batch
        stacked = X.stacked_blocks(cfg, params)
        vals = X.edge_chunk_scan(cfg, TASK, params, stacked, batch, jnp.asarray(0, jnp.int32),
                                 resids, mlp_inputs, delta, senders, receivers, None)
        return vals, logits, resids, mlp_inputs, delta, stacked
      vals = X.edge_chunk(cfg, TASK, 0, params, batch, resids[0], mlp_inputs[0],
                          delta[:, :, :n_up], senders, receivers, None)
      return vals, logits, resids, mlp_inputs, delta  # all live while the chunks run

    idx = _spec((size,), jnp.int32)
    return fn, (params, MP.abstract_batch(b, seq_len, mesh), idx, idx)
  return build


def circuit(cfg: ModelConfig, params, seq_len: int, mesh=None) -> MP.Builder:
  """The circuit forward: `prepare` a batch, then one circuit's metric (GQA ungrouped)."""
  ucfg = dataclasses.replace(cfg, n_kv_heads=None)  # the graph's heads: GQA ungrouped
  shape = (E.n_senders(ucfg), E.n_receivers(ucfg))

  def build(b):
    def fn(params, batch, w):
      c, p = T.ungroup_kv(cfg, params)
      prep = CF.prepare(c, TASK, p, batch, PATCHING)
      total, scratch = CF.circuit_metric(c, TASK, p, batch, prep, w, CF.scratch_like(c, prep))
      kv = [p[f"blocks_{li}"]["attn"][n] for li in range(cfg.n_layers) for n in ("W_K", "W_V")]
      return total, prep, scratch, kv if cfg.n_heads != cfg.kv_heads else []
    return fn, (params, MP.abstract_batch(b, seq_len, mesh), _spec(shape, jnp.float32))
  return build


def patching(cfg: ModelConfig, params, seq_len: int, sweep: str, chunk: int,
             mesh=None) -> MP.Builder:
  """Activation patching: baselines, the sources of one sweep, one chunk of patched forwards."""
  sw = PT.get_sweep(sweep)
  sites = tuple(sw.site_of(li) for li in range(cfg.n_layers))

  def build(b):
    def fn(params, batch, cells):
      clean_logits = PT._baselines(cfg, TASK, params, batch)[2]
      cache = PT._collect(cfg, sites, params, batch.corrupted, batch.mask)
      sources = tuple(cache[s] for s in sites)
      vals = PT._sweep_chunk(cfg, TASK, sw, "noising", params, batch, sources, clean_logits,
                             cells)
      return vals, clean_logits, sources
    return fn, (params, MP.abstract_batch(b, seq_len, mesh), _spec((chunk,), jnp.int32))
  return build


def train(cfg: ModelConfig, params, seq_len: int, mesh=None) -> MP.Builder:
  """A training step: cross-entropy of the last position, its gradient and an AdamW update."""
  opt = optax.adamw(1e-2, weight_decay=0.1)
  state = jax.eval_shape(opt.init, params)

  def build(b):
    def fn(params, state, batch):
      def loss(p):
        lg = T.forward(cfg, p, batch.clean)[:, -1]
        return optax.softmax_cross_entropy_with_integer_labels(
            lg, batch.labels["correct"]).mean()
      g = jax.grad(loss)(params)
      up, state = opt.update(g, state, params)
      return optax.apply_updates(params, up), state
    return fn, (params, state, MP.abstract_batch(b, seq_len, mesh))
  return build
