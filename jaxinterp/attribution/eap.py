"""EAP, EAP-IG-inputs and clean-corrupted: one receiver-gradient estimate at different alphas.

In graph form a receiver reads `x_r = resid_r - sum_s (1 - w[s,r]) (live_s - ablated_s)`, so at
`w = 1`

    dm/dw[s, r] = sum_pos (live_s - ablated_s) . dm/dx_r

and the attribution-patching score `(a_s^ablated - a_s^clean) . dm/dx_r` is `-dm/dw`: the
first-order estimate of m(edge ablated) - m(clean), in the metric's units (negative: the edge
helps the metric). The three methods differ only in where `dm/dx_r` is taken, as the average over
input embeddings interpolated from corrupted to clean at points alpha:

- EAP (Nanda 2023; Syed et al. 2023): alpha = 1, the clean input.
- EAP-IG-inputs (Hanna et al. 2024, "Have Faith in Faithfulness"): alpha_k = k/m, k = 0..m-1 (the
  `eap` package's convention; `ig_convention="paper"` gives k = 1..m).
- clean-corrupted: alpha in {0, 1}, the mean of the corrupted- and clean-input gradients.

All three run on the receiver-gradient kernel (`receiver_grads.ig_inputs_batch`). With
`level="node"` or `"neuron"` (`base.Options.level`) they score nodes or their output dimensions
instead (NAP, NAP-IG-inputs: `nodes.node_batch`, at `attribute_node`'s alphas k/m, k = 1..m).
`weight_gradient_batch` is the definition above taken literally (gradients of the edge weights),
kept as the reference the kernel is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

from jaxinterp.attribution import base, contraction, memory_budget, nodes, receiver_grads
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import embed_inputs, forward, sender_outputs
from jaxinterp.runtime import shared_prefix
from jaxinterp.tasks import metrics as task_metrics


@jax.jit
def _valid_total(valid, values):
  """The sum of `values` [batch] over the real rows `valid` [batch]: one small program (as
  `jnp.sum(jnp.where(...))` eagerly, whose two programs gave the same bits), so that only one
  compile waits on the attribution's critical path while the curve compiles in the background."""
  return jnp.sum(jnp.where(valid, values, 0.0))


def kernel_call(alphas, cfg, task, params, batch, ablation, options, interpolate="inputs"):
  """The edge-level kernel `ig_inputs_batch` and the arguments it is called with on `batch`
  (`interpolate`: "inputs", or "activations" for EAP-IG-activations)."""
  chunks, budget, remat = {}, getattr(options, "memory_budget", None), options.remat
  shards = contraction.data_shards_of(batch.clean)  # rows over a mesh's "data" axis
  if budget is not None:  # rows and contraction chunks whose temporaries fit the budget (remat
    plan = memory_budget.inputs_plan(  # if only a remat'd row fits) on each device
        cfg, params, batch.clean.shape, alphas.shape[0], budget, options.remat, shards,
        interpolate)
    chunks["row_chunks"], chunks["chunk_bytes"] = plan.row_chunks, plan.chunk_bytes
    remat = plan.remat
    memory_budget.print_note(plan, f"EAP-IG-{interpolate}", budget)
  suffix = None
  if not remat and interpolate == "inputs":
    suffix = shared_prefix.plan(cfg, batch, ablation.kind)
  if shards > 1:  # each device contracts (and groups) its own rows: no all-gather of the batch
    chunks["data_shards"] = shards
  return ((cfg, task, params, batch, ablation, alphas),
          dict(remat=remat, suffix=suffix, interpolate=interpolate, **chunks))


def kernel_scores(alphas, cfg, task, params, batch, ablation, options,
                  interpolate="inputs") -> base.BatchScores:
  """A batch's scores from the edge-level kernel at `alphas` (`kernel_call`); at --level=node or
  neuron, `nodes.score_batch`'s."""
  if options.level != "edge":
    return nodes.score_batch(alphas, cfg, task, params, batch, ablation, options)
  args, kwargs = kernel_call(alphas, cfg, task, params, batch, ablation, options, interpolate)
  s, values, c_values = receiver_grads.ig_inputs_batch(*args, **kwargs)
  return base.BatchScores(s, values, c_values, _valid_total(batch.valid, c_values))


@dataclasses.dataclass(frozen=True)
class EdgeKernel:
  """One EAP-family method's edge-level kernel: `ig_inputs_batch` at the alphas
  `alphas_of(options)`, its steps interpolating `interpolate` ("inputs", or "activations" for
  EAP-IG-activations). Called, it is the method's `Method.compile_batch`: it compiles, running
  nothing, the programs `kernel_scores` runs on a batch of this shape (edge level; the node and
  neuron kernels compile on first use). `--dry_run` plans the method from the same two fields."""

  alphas_of: Callable[[base.Options], Array]
  interpolate: str = "inputs"

  def __call__(self, cfg, task, params, batch, ablation, options) -> None:
    if options.level != "edge":
      return
    args, kwargs = kernel_call(self.alphas_of(options), cfg, task, params, batch, ablation,
                               options, self.interpolate)
    receiver_grads.ig_inputs_batch.lower(*args, **kwargs).compile()
    c_values = jax.ShapeDtypeStruct(batch.valid.shape, jnp.float32)  # [batch]
    _valid_total.lower(batch.valid, c_values).compile()


def _eap_alphas(options) -> Array:
  return jnp.asarray([1.0], jnp.float32)


def _ig_alphas(options) -> Array:
  return jnp.asarray(options.alphas(eap_start=0 if options.level == "edge" else 1))


def _clean_corrupted_alphas(options) -> Array:
  return jnp.asarray([0.0, 1.0], jnp.float32)


def score_eap(cfg, task, params, batch, ablation, options: base.Options) -> base.BatchScores:
  """EAP: the receiver gradients at the clean input."""
  return kernel_scores(_eap_alphas(options), cfg, task, params, batch, ablation, options)


def score_eap_ig_inputs(cfg, task, params, batch, ablation,
                        options: base.IGOptions) -> base.BatchScores:
  """EAP-IG-inputs: the receiver gradients averaged over interpolated input embeddings (the "eap"
  convention's k starts at 0 for edges, at 1 for nodes and neurons, as `attribute_node`)."""
  return kernel_scores(_ig_alphas(options), cfg, task, params, batch, ablation, options)


def score_clean_corrupted(cfg, task, params, batch, ablation,
                          options: base.Options) -> base.BatchScores:
  """clean-corrupted: the mean of the receiver gradients at the corrupted and the clean input."""
  return kernel_scores(_clean_corrupted_alphas(options), cfg, task, params, batch, ablation,
                        options)


@functools.partial(jax.jit, static_argnames=("cfg", "task", "remat"))
def weight_gradient_batch(cfg, task, params, batch, ablation, alphas, remat=False):
  """Reference EAP-IG-inputs kernel: gradients of the edge weights `w` at w = 1.

  `attribute` uses the equivalent, faster `receiver_grads.ig_inputs_batch`; this direct form of the
  definition is kept as the cross-check the tests compare it with. Returns (Float[Array, "sender
  receiver"] score sums over the batch's real rows, Float[Array, "batch"] metric at the last alpha).
  """
  ablated = ablation.values(cfg, params, batch)
  clean_logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  clean = sender_outputs(cfg, params, batch.clean, batch.mask)
  e_clean = clean[:, :, 0]
  e_corrupt = embed_inputs(cfg, params, batch.corrupted, batch.mask)

  def f(w, alpha):
    emb = e_corrupt + alpha.astype(e_clean.dtype) * (e_clean - e_corrupt)
    logits = forward(cfg, params, batch.clean, attention_mask=batch.mask, input_embeds=emb,
                     edges=EdgePatch(w, ablated, live=clean), remat=remat)
    return task_metrics.metric_sum(task, logits, batch, clean_logits)

  def step(total, alpha):
    g, values = jax.grad(f, has_aux=True)(base.ones(cfg), alpha)
    return total + g, values

  total, values = jax.lax.scan(step, jnp.zeros_like(base.ones(cfg)), alphas)
  return -total / alphas.shape[0], values[-1]


EAP = base.Method(
    "EAP", "attribution patching: (a_ablated - a_clean) . dm/dx_r at the clean input (--level="
    "node|neuron: NAP, per node or output dimension)", score_eap, base.Options, levels=base.LEVELS,
    compile_batch=EdgeKernel(_eap_alphas))
EAP_IG_INPUTS = base.Method(
    "EAP-IG-inputs", "EAP with dm/dx_r averaged over m input embeddings interpolated corrupted -> "
    "clean (integrated gradients; --level=node|neuron: NAP-IG-inputs)", score_eap_ig_inputs,
    base.IGOptions, ("patching",), needs_corrupted=True, levels=base.LEVELS,
    compile_batch=EdgeKernel(_ig_alphas))
CLEAN_CORRUPTED = base.Method(
    "clean-corrupted", "EAP with the mean of the gradients at the clean and at the corrupted input",
    score_clean_corrupted, base.Options, needs_corrupted=True, levels=base.LEVELS,
    compile_batch=EdgeKernel(_clean_corrupted_alphas))
