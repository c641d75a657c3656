"""EAP-IG-activations: integrated gradients over each layer's outputs in turn.

As EAP-IG-inputs, but instead of the input embeddings it interpolates one "layer node" at a time
(the input, each attention layer's head outputs, each MLP's output) from its corrupted to its clean
value, alpha_k = k/m for k = 1..m, as the `eap` package does; the edge-weight gradients are averaged
over all layer nodes and steps. Scores are `-dm/dw`, in the metric's units. Under an ablation other
than patching a node is interpolated from its ablated value instead (zero ablation: from zero, as
the package does; mean and optimal ablation: from those values, where the package starts from zero
too), so the corrupted prompts are read only under patching.

The scores are linear in the receiver gradients, as EAP-IG-inputs' are, so `attribute` runs them
on the receiver-gradient kernel (`receiver_grads.ig_inputs_batch(..., interpolate="activations")`:
one plain forward and backward per layer node and step). `weight_gradient_batch` is the definition
taken literally (gradients of the edge weights of the graph-form model), kept as the reference the
kernel is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinterp.attribution import base, eap
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import embed_inputs, forward, sender_outputs
from jaxinterp.tasks import metrics as task_metrics


def _layer_groups(cfg: ModelConfig) -> list[tuple[str, str | None]]:
  """The 'layer nodes' EAP-IG-activations interpolates one at a time: input, each attn, each MLP."""
  groups = [("input", None)]
  for li in range(cfg.n_layers):
    groups += [("attn", f"blocks.{li}.attn.hook_result"), ("mlp", f"blocks.{li}.hook_mlp_out")]
  return groups


@functools.partial(jax.jit, static_argnames=("cfg", "task", "remat"))
def weight_gradient_batch(cfg, task, params, batch, ablation, alphas, remat=False):
  """Reference EAP-IG-activations kernel: gradients of the graph-form model's edge weights `w` at
  w = 1, with each layer node (at `hook_result` and `hook_mlp_out`, as the `eap` package hooks
  them) interpolated in turn, from their corrupted values (patching) or, under another ablation,
  from each head's and MLP's ablated sender value (the input node likewise: its ablated value).
  The latter reads `hook_result` as the heads' senders: models without post-norms.

  Returns (Float[Array, "sender receiver"] score sums over the batch's real rows, Float[Array,
  "batch"] metric values at the last step), as the kernel `attribute` uses.
  """
  ablated = ablation.values(cfg, params, batch)
  groups = _layer_groups(cfg)
  names = tuple(n for _, n in groups if n)
  clean_logits, clean_cache = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                                      collect=names)
  clean = sender_outputs(cfg, params, batch.clean, batch.mask)
  e_clean = clean[:, :, 0]
  if ablation.kind == "patching":
    _, corrupt_cache = forward(cfg, params, batch.corrupted, attention_mask=batch.mask,
                               collect=names)
    e_corrupt = embed_inputs(cfg, params, batch.corrupted, batch.mask)
  else:  # each layer node's senders at their ablated values
    H = cfg.n_heads
    corrupt_cache = {n: ablated[:, :, 1 + li * (H + 1):1 + li * (H + 1) + H] if "attn" in n
                     else ablated[:, :, 1 + li * (H + 1) + H]
                     for n, li in ((n, int(n.split(".")[1])) for n in names)}
    e_corrupt = ablated[:, :, 0]
  G = len(groups)

  def f(w, g, alpha):
    s = jax.nn.one_hot(g, G, dtype=e_clean.dtype)
    emb = e_clean + s[0] * (alpha * e_clean + (1 - alpha) * e_corrupt - e_clean)
    iv = {n: base.Blend(clean_cache[n], corrupt_cache[n], s[i + 1], alpha)
          for i, n in enumerate(names)}
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
  return -total / (G * alphas.shape[0]), values[-1]


def _alphas(options: base.IGOptions) -> jax.Array:
  return jnp.asarray(options.alphas(eap_start=1))


def score_batch(cfg, task, params, batch, ablation, options: base.IGOptions) -> base.BatchScores:
  """EAP-IG-activations scores of one batch, on the receiver-gradient kernel (with
  `options.memory_budget`, in the groups of rows `memory_budget.inputs_plan` plans,
  rematerialised where only that fits)."""
  return eap.kernel_scores(_alphas(options), cfg, task, params, batch, ablation, options,
                           interpolate="activations")


EAP_IG_ACTIVATIONS = base.Method(
    "EAP-IG-activations", "EAP-IG interpolating each layer's outputs in turn instead of the inputs",
    score_batch, base.IGOptions, levels=("edge", "position"),
    compile_batch=eap.EdgeKernel(_alphas, "activations"))
