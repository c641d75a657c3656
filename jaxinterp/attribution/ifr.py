"""Information flow routes (IFR; Ferrando & Voita 2024), as the `eap` package's
`information-flow-routes` defines it: one clean forward, no corrupted run, no metric gradient.

For a receiver r with input x_r (`[batch, pos, d_model]`: the residual stream a head's q/k/v or an
MLP reads before its norm, or the final residual for the logits) and each upstream sender s with
output o_s, the proximity of s to r is

    prox[s] = max(0, ||x_r||_1 - ||o_s - x_r||_1)

and the edge's importance is s's share of it, `prox[s] / sum_{s' upstream of r} prox[s']`. The score
of s -> r is that share averaged over each example's real positions, then over the examples: a
proportion in [0, 1], not a metric change (every receiver's scores sum to 1; higher = more of the
receiver's input comes from the sender). A position where no sender is proximate (all prox = 0,
where `eap` would divide by zero) contributes 0.

As in `eap`, the q, k and v inputs of every head of a layer read the same residual stream and get
the same scores, and the input node's output is `hook_embed`, the token embedding alone
(`ifr_input="token"`); `ifr_input="token+position"` uses the project's input node (token plus
position embedding) instead (the same on models without learned positions). Head outputs exclude
the attention output bias, which stays in x_r unattributed, as in `eap`.

The method uses no ablation and no corrupted prompts, so it runs on tasks that have none; its
`intervention` is ignored (circuits found with it are still evaluated under the one given).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from jaxinterp.attribution import base
from jaxinterp.models import edges as E
from jaxinterp.models.edges import EdgePatch
from jaxinterp.models.transformer import forward
from jaxinterp.runtime import compile_policy

IFR_INPUTS = ("token", "token+position")


@dataclasses.dataclass(frozen=True)
class IFROptions(base.Options):
  """Options of information flow routes.

  Attributes:
    ifr_input: the input node's output: "token" (`hook_embed`, as `eap`) or "token+position" (the
      project's input node; equal to "token" on rotary models).
  """

  ifr_input: str = "token"

  def __post_init__(self):
    super().__post_init__()
    if self.ifr_input not in IFR_INPUTS:
      raise base.AttributionError(f"ifr_input must be one of {IFR_INPUTS}, got {self.ifr_input!r}")


def _shares(x, senders, mask):
  """Per-example mean over real positions of each sender's proximity share of x.

  Args:
    x: Float[Array, "batch pos d_model"], the receiver input.
    senders: Float[Array, "batch pos n_up d_model"], the upstream senders' outputs.
    mask: Bool[Array, "batch pos"], real tokens.

  Returns:
    Float[Array, "batch n_up"].
  """
  x = x.astype(jnp.float32)
  norm = jnp.sum(jnp.abs(x), -1)  # [b, p]
  dist = jnp.sum(jnp.abs(senders.astype(jnp.float32) - x[:, :, None]), -1)  # [b, p, n_up]
  prox = jnp.maximum(norm[..., None] - dist, 0.0)
  total = jnp.sum(prox, -1, keepdims=True)
  share = jnp.where(total > 0, prox / jnp.where(total > 0, total, 1.0), 0.0)
  share = jnp.where(mask[..., None], share, 0.0)
  n_real = jnp.maximum(jnp.sum(mask, -1), 1).astype(jnp.float32)
  return jnp.sum(share, 1) / n_real[:, None]


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "token_input"))
def ifr_batch(cfg, task, params, batch, token_input: bool = True):
  """IFR scores of one batch.

  Returns (Float[Array, "sender receiver"]: the sum over the batch's real rows of each example's
  position-averaged importance, zero on invalid edges; Float[Array, "batch"] clean metric values).
  """
  L, H = cfg.n_layers, cfg.n_heads
  mid = "hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"
  names = tuple(dict.fromkeys([f"blocks.{li}.hook_resid_pre" for li in range(L)]
                              + [f"blocks.{li}.{mid}" for li in range(L)]
                              + [f"blocks.{L - 1}.hook_resid_post", "hook_senders", "hook_embed"]))
  logits, cache = forward(cfg, params, batch.clean, attention_mask=batch.mask,
                          edges=EdgePatch(None, None), collect=names)
  senders = cache["hook_senders"]  # [b, p, S, d]
  if token_input:
    senders = senders.at[:, :, 0].set(cache["hook_embed"].astype(senders.dtype))
  rows = batch.valid.astype(jnp.float32)
  scores = jnp.zeros((E.n_senders(cfg), E.n_receivers(cfg)), jnp.float32)

  def put(scores, x, n_up, r0, nr):
    s = jnp.einsum("bs,b->s", _shares(x, senders[:, :, :n_up], batch.mask), rows)
    return scores.at[:n_up, r0:r0 + nr].set(jnp.broadcast_to(s[:, None], (n_up, nr)))

  for li in range(L):
    scores = put(scores, cache[f"blocks.{li}.hook_resid_pre"], E.n_upstream_of_attn(cfg, li),
                 E.head_receiver(cfg, li, 0, "q"), 3 * H)
    scores = put(scores, cache[f"blocks.{li}.{mid}"], E.n_upstream_of_mlp(cfg, li),
                 E.mlp_receiver(cfg, li), 1)
  scores = put(scores, cache[f"blocks.{L - 1}.hook_resid_post"], E.n_senders(cfg),
               E.logits_receiver(cfg), 1)
  values = task.metric(logits, batch, logits)
  return scores, values


def score_batch(cfg, task, params, batch, ablation, options: IFROptions) -> base.BatchScores:
  """IFR scores of one batch (the ablation is unused); the metric reported is the clean one."""
  del ablation
  s, values = ifr_batch(cfg, task, params, batch, token_input=options.ifr_input == "token")
  total = jnp.sum(jnp.where(batch.valid, values, 0.0))
  return base.BatchScores(s, values, values, total)


IFR = base.Method(
    "information-flow-routes", "information flow routes (Ferrando & Voita 2024): the share of a "
    "receiver's input (L1 proximity) each sender contributes, from one clean forward; no ablation, "
    "no corrupted prompts", score_batch, IFROptions, needs_corrupted=False, ablates=False,
    convention="loss")
