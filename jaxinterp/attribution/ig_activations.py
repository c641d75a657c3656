"""EAP-IG-activations: integrated gradients over each layer's outputs in turn.

As EAP-IG-inputs, but instead of the input embeddings it interpolates one "layer node" at a time
(the input, each attention layer's head outputs, each MLP's output) from its corrupted to its clean
value, alpha_k = k/m for k = 1..m, as the `eap` package does; the edge-weight gradients are averaged
over all layer nodes and steps. Scores are `-dm/dw`, in the metric's units.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from jaxinterp.attribution import base, contraction, memory_budget
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import embed_inputs, forward, sender_outputs
from jaxinterp.tasks import metrics as task_metrics

Array = jax.Array


def _layer_groups(cfg: ModelConfig) -> list[tuple[str, str | None]]:
  """The 'layer nodes' EAP-IG-activations interpolates one at a time: input, each attn, each MLP."""
  groups = [("input", None)]
  for li in range(cfg.n_layers):
    groups += [("attn", f"blocks.{li}.attn.hook_result"), ("mlp", f"blocks.{li}.hook_mlp_out")]
  return groups


@flax.struct.dataclass
class _Blend:
  """x + s * (alpha * clean + (1 - alpha) * corrupted - x): interpolate one site when s = 1."""

  clean: Array
  corrupted: Array
  s: Array
  alpha: Array

  def __call__(self, x):
    target = self.alpha * self.clean + (1 - self.alpha) * self.corrupted
    return x + self.s * (target.astype(x.dtype) - x)


@functools.partial(jax.jit, static_argnames=("cfg", "task", "remat", "row_chunks", "data_shards"))
def _ig_activations_batch(cfg, task, params, batch, ablation, alphas, remat=False, row_chunks=1,
                          data_shards=1):
  """(Float[Array, "sender receiver"] scores summed over the batch's real rows, Float[Array,
  "batch"] metric values at the last step).

  `row_chunks` > 1 (`memory_budget.activations_row_chunks`, for `--memory_budget`) runs the
  kernel on that many groups of rows in turn, in one `lax.scan` (their temporaries share buffers),
  and sums the groups' gradients: the peak of temporaries is one group's. 1 is the unchunked kernel.
  With the rows split over `data_shards` devices (a mesh's "data" axis), every group holds rows of
  each device's own (`contraction.group_rows`).
  """
  n = len(_layer_groups(cfg)) * alphas.shape[0]
  if row_chunks == 1:
    total, values = _ig_activations(cfg, task, params, batch, ablation, alphas, remat)
    return -total / n, values
  groups = contraction.group_rows(batch, row_chunks, data_shards)

  def body(total, group):
    g, values = _ig_activations(cfg, task, params, group, ablation, alphas, remat)
    return total + g, values

  total, values = jax.lax.scan(body, jnp.zeros_like(base.ones(cfg)), groups)
  return -total / n, contraction.ungroup_rows(values, data_shards)


def _ig_activations(cfg, task, params, batch, ablation, alphas, remat):
  """The edge-weight gradients summed over the layer nodes and steps ([sender, receiver]) and the
  metric values at the last step ([batch]), on one group of rows."""
  ablated = ablation.values(cfg, params, batch)
  groups = _layer_groups(cfg)
  names = tuple(n for _, n in groups if n)
  clean_logits, clean_cache = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                                      collect=names)
  _, corrupt_cache = forward(cfg, params, batch.corrupted, attention_mask=batch.mask, collect=names)
  clean = sender_outputs(cfg, params, batch.clean, batch.mask)
  e_clean = clean[:, :, 0]
  e_corrupt = embed_inputs(cfg, params, batch.corrupted, batch.mask)
  G = len(groups)

  def f(w, g, alpha):
    s = jax.nn.one_hot(g, G, dtype=e_clean.dtype)
    emb = e_clean + s[0] * (alpha * e_clean + (1 - alpha) * e_corrupt - e_clean)
    iv = {n: _Blend(clean_cache[n], corrupt_cache[n], s[i + 1], alpha) for i, n in enumerate(names)}
    logits = forward(cfg, params, batch.clean, attention_mask=batch.mask, input_embeds=emb,
                     interventions=iv, edges=EdgePatch(w, ablated, live=clean), remat=remat)
    return task_metrics.metric_sum(task, logits, batch, clean_logits)

  gs = jnp.repeat(jnp.arange(G), alphas.shape[0])
  als = jnp.tile(alphas, G)

  def step(total, ga):
    g, values = jax.grad(f, has_aux=True)(base.ones(cfg), ga[0].astype(jnp.int32), ga[1])
    return total + g, values

  total, values = jax.lax.scan(step, jnp.zeros_like(base.ones(cfg)),
                               jnp.stack([gs.astype(alphas.dtype), als], 1))
  return total, values[-1]


def score_batch(cfg, task, params, batch, ablation, options: base.IGOptions) -> base.BatchScores:
  """EAP-IG-activations scores of one batch (with `options.memory_budget`, in the groups of rows
  `memory_budget.activations_plan` plans, rematerialised where only that fits)."""
  c_total, c_values, _ = task_metrics.clean_metric(cfg, task, params, batch)
  alphas = jnp.asarray(options.alphas(eap_start=1))
  chunks, remat = {}, options.remat
  if options.memory_budget is not None:  # rows in groups; remat if only a remat'd row fits
    shards = contraction.data_shards_of(batch.clean)  # each device's rows in every group
    plan = memory_budget.activations_plan(cfg, params, batch.clean.shape, alphas.shape[0],
                                          options.memory_budget, options.remat, shards)
    chunks = dict(row_chunks=plan.row_chunks, data_shards=shards)
    remat = plan.remat
    memory_budget.print_note(plan, "EAP-IG-activations", options.memory_budget)
  s, values = _ig_activations_batch(cfg, task, params, batch, ablation, alphas, remat=remat,
                                    **chunks)
  return base.BatchScores(s, values, c_values, c_total)


EAP_IG_ACTIVATIONS = base.Method(
    "EAP-IG-activations", "EAP-IG interpolating each layer's outputs in turn instead of the inputs",
    score_batch, base.IGOptions, levels=("edge", "position"))
