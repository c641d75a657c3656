"""Node- and neuron-level attribution patching (NAP, NAP-IG-inputs), as the `eap` package's
`attribute_node` defines them: the `level="node"` / `"neuron"` kernel of EAP, EAP-IG-inputs and
clean-corrupted (`eap.py` dispatches here; `exact.py` has exact node patching).

A node is a sender: the input embedding, a head's output (`hook_result`, no output bias) or an
MLP's output. Ablating a node replaces its output in every receiver at once, which in the graph form
is the residual stream shifted by (ablated - clean) where the node writes. Its first-order effect is

    node score[s]      = sum_pos (a_s^ablated - a_s^clean) . dm/da_s
    neuron score[s, i] = sum_pos (a_s^ablated - a_s^clean)_i (dm/da_s)_i      (i < d_model)

with dm/da_s the gradient at the node's output: `blocks.0.hook_resid_pre` for the input,
`blocks.{layer}.hook_attn_out` for every head of the layer (a head's output enters the residual
only through the layer's sum) and `blocks.{layer}.hook_mlp_out` for an MLP. Scores are in the
metric's units, averaged over examples by `attribute`, with the same sign as edge scores
(negative: the node helps the metric). A node score is the sum of its neuron scores, and, for EAP,
the sum of its outgoing edge scores (every receiver reads the residual stream the node writes to).

"Neurons" follow `eap`: every dimension of a node's output in d_model (for a head, a dimension of
its `hook_result`; for an MLP, of its output), `[n_senders, d_model]`, so that a neuron circuit is a
per-dimension mask on the senders (`evaluation.evaluate_neuron_circuits`).

IG averages dm/da_s over input embeddings interpolated corrupted -> clean at alpha_k = k/m,
k = 1..m: `attribute_node`'s convention (its edge-level EAP-IG uses k = 0..m-1), whatever
`ig_convention` says. Note that `eap` before its PR #23 took the MLPs' gradient at their input
(`hook_mlp_in`), a bug its maintainer fixed; this module follows the fix.

One forward and backward per alpha through the scanned blocks, and one [batch, pos, sender, d_model]
contraction per batch: no per-receiver gradients, so a node-level run costs less than an edge-level
one (and `remat` has no effect on it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinterp.attribution import base, receiver_grads
from jaxinterp.models.transformer import (
  Norm,
  embed_inputs,
  last_token_logits,
  run_blocks,
  stack_blocks,
)
from jaxinterp.runtime import compile_policy
from jaxinterp.tasks import metrics as task_metrics


def _senders(cfg, params, stacked, emb, mask):
  """Every sender's output, Float[Array, "batch pos sender d_model"] (input first), and the
  residual after the last block, from one (scanned) forward of the blocks."""
  final, ys = run_blocks(cfg, params, emb, mask, record_senders=True, stacked=stacked)
  per_layer = jnp.moveaxis(ys["hook_senders"], 0, 2)  # [b, p, L, H + 1, d]
  b, p = mask.shape
  return jnp.concatenate([emb[:, :, None], per_layer.reshape(b, p, -1, cfg.d_model)], 2), final


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "neuron"))
def node_batch(cfg, task, params, batch, ablation, alphas, neuron: bool = False):
  """Node (or neuron) attribution-patching scores of one batch.

  Args:
    ablation: an `ablation.Ablation` (the ablated sender values).
    alphas: Float[Array, "steps"], where the gradients are taken on the path corrupted -> clean
      input embedding ([1.0] is NAP at the clean input).
    neuron: per d_model dimension instead of summed over it.

  Returns:
    (Float[Array, "sender d_model"] if `neuron` else Float[Array, "sender"]: the sum over the
    batch's real rows, averaged over alphas; Float[Array, "batch"] metric at the last alpha;
    Float[Array, "batch"] clean metric).
  """
  L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_model
  b, p = batch.clean.shape
  stacked = stack_blocks(cfg, params) if receiver_grads.scan_blocks_fits(cfg, params) else None
  e_clean = embed_inputs(cfg, params, batch.clean, batch.mask)
  e_corrupt = embed_inputs(cfg, params, batch.corrupted, batch.mask)
  if ablation.kind == "patching":  # clean and corrupted senders in one forward
    both, final = _senders(cfg, params, stacked, jnp.concatenate([e_clean, e_corrupt]),
                           jnp.concatenate([batch.mask, batch.mask]))
    clean, ablated, final = both[:b], both[b:], final[:b]
  else:
    clean, final = _senders(cfg, params, stacked, e_clean, batch.mask)
    ablated = ablation.values(cfg, params, batch)
  diff = (ablated - clean).astype(jnp.float32)  # [b, p, S, d]

  def norm(x):
    return Norm(cfg).apply({"params": params["ln_final"]}, x)

  clean_logits = last_token_logits(cfg, params, norm(final), batch.last)
  clean_values = task.metric(clean_logits, batch.replace(last=jnp.zeros_like(batch.last)),
                             clean_logits)
  read_clean = clean_logits if task.needs_clean_logits else None
  dt = e_clean.dtype
  eps0 = (jnp.zeros((b, p, d), dt), {"hook_attn_out": jnp.zeros((L, b, p, d), dt),
                                     "hook_mlp_out": jnp.zeros((L, b, p, d), dt)})

  def f(eps, alpha):
    shift_in, shifts = eps
    emb = e_corrupt + alpha.astype(dt) * (e_clean - e_corrupt) + shift_in
    iv = {k: base.Shift(v) for k, v in shifts.items()}
    resid, _ = run_blocks(cfg, params, emb, batch.mask, iv, stacked=stacked)
    return task_metrics.metric_at_last(cfg, task, params, batch, norm(resid), read_clean)

  def step(total, alpha):
    g, values = jax.grad(f, has_aux=True)(eps0, alpha)
    g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
    return jax.tree.map(jnp.add, total, g), values

  zero = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), eps0)
  (g_in, g), values = jax.lax.scan(step, zero, alphas)
  blocks = diff[:, :, 1:].reshape(b, p, L, H + 1, d)
  heads = jnp.einsum("bplhd,lbpd->lhd", blocks[:, :, :, :H], g["hook_attn_out"])
  mlps = jnp.einsum("bpld,lbpd->ld", blocks[:, :, :, H], g["hook_mlp_out"])
  per_layer = jnp.concatenate([heads, mlps[:, None]], 1).reshape(L * (H + 1), d)
  scores = jnp.concatenate([jnp.einsum("bpd,bpd->d", diff[:, :, 0], g_in)[None], per_layer])
  scores = scores / alphas.shape[0]
  return (scores if neuron else scores.sum(-1)), values[-1], clean_values


def score_batch(alphas, cfg, task, params, batch, ablation, options) -> base.BatchScores:
  """`base.BatchScores` of `node_batch` at these alphas, at `options.level` ("node"/"neuron")."""
  s, values, c_values = node_batch(cfg, task, params, batch, ablation,
                                   jnp.asarray(alphas, jnp.float32),
                                   neuron=options.level == "neuron")
  return base.BatchScores(s, values, c_values, jnp.sum(jnp.where(batch.valid, c_values, 0.0)))
