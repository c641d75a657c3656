"""Graph form of the forward pass: receivers read a weighted mix of live and ablated senders.

This is the "edge-level" intervention of EAP/EAP-IG, expressed as an explicit argument to the one
forward pass (no second copy of the model). Senders are the input embedding, every attention head's
output (`hook_result`, no output bias) and every MLP output. Receivers are every head's q, k and v
input, every MLP input and the logits input. Each receiver `r` reads

    x_r = resid_r - sum_s (1 - w[s, r]) * (live_s - ablated_s)

which equals sum_s w[s,r] live_s + (1 - w[s,r]) ablated_s plus the constant biases. `w` is the
`[n_senders, n_receivers]` weight matrix; only upstream senders are read, so entries for invalid
edges are ignored.

Index layout (the EAP-IG `graph.py` layout):
- senders: 0 is `input`; layer l has heads at 1 + l*(H+1) + h and its MLP at 1 + l*(H+1) + H.
- receivers: layer l has q heads at l*(3H+1) + h, k heads at +H, v heads at +2H, the MLP at +3H;
  the logits receiver is last, at L*(3H+1).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

Array = jax.Array


def n_senders(cfg: ModelConfig) -> int:
  return 1 + cfg.n_layers * (cfg.n_heads + 1)


def n_receivers(cfg: ModelConfig) -> int:
  return cfg.n_layers * (3 * cfg.n_heads + 1) + 1


def head_sender(cfg: ModelConfig, layer: int, head: int) -> int:
  return 1 + layer * (cfg.n_heads + 1) + head


def mlp_sender(cfg: ModelConfig, layer: int) -> int:
  return 1 + layer * (cfg.n_heads + 1) + cfg.n_heads


def head_receiver(cfg: ModelConfig, layer: int, head: int, qkv: str) -> int:
  return layer * (3 * cfg.n_heads + 1) + "qkv".index(qkv) * cfg.n_heads + head


def mlp_receiver(cfg: ModelConfig, layer: int) -> int:
  return layer * (3 * cfg.n_heads + 1) + 3 * cfg.n_heads


def logits_receiver(cfg: ModelConfig) -> int:
  return cfg.n_layers * (3 * cfg.n_heads + 1)


def n_upstream_of_attn(cfg: ModelConfig, layer: int) -> int:
  """Senders read by the q/k/v inputs of `layer`: input and all earlier layers."""
  return 1 + layer * (cfg.n_heads + 1)


def n_upstream_of_mlp(cfg: ModelConfig, layer: int) -> int:
  """Senders read by the MLP of `layer`; with parallel blocks its own heads are not upstream."""
  return n_upstream_of_attn(cfg, layer) + (0 if cfg.parallel_attn_mlp else cfg.n_heads)


@flax.struct.dataclass
class EdgePatch:
  """Edge weights and counterfactual sender values for one graph-form forward.

  Attributes:
    weights: Float[Array, "sender receiver"]; 1 keeps an edge live, 0 ablates it. None (with
      `ablated` None) runs the plain model and only records the senders (site `hook_senders`).
    ablated: Float[Array, "batch pos sender d_model"]; the senders' counterfactual outputs (a
      corrupted run, zeros or means).
    live: optional Float[Array, "batch pos sender d_model"]; if given, the "live" sender values are
      these fixed arrays instead of this run's own outputs. Attribution uses this to take gradients
      of `weights` against a fixed (clean - corrupted) difference at interpolated inputs.
  """

  weights: jax.Array | None
  ablated: jax.Array | None
  live: jax.Array | None = None


class GraphState:
  """Running state of one graph-form forward: the senders' (live - ablated) differences.

  Kept sender-major (`[sender, batch, pos, d_model]`) in two parts: a `prefix` that is the same for
  every vmapped copy of the forward (the fixed differences when `EdgePatch.live` is given, as in
  attribution, or those of the senders before a `LayerStart`), and the per-layer differences this
  run computes itself. Under `vmap` over edge weights only the second part is per copy, and under
  `grad` the backward pass keeps a single copy of the prefix.
  """

  def __init__(self, patch: EdgePatch):
    self.patch = patch
    self.outputs: list[Array] = []  # this run's own sender outputs
    self.n = 0
    self.prefix = None
    self.new: list[Array] = []
    if patch.weights is not None and patch.live is not None:
      self.prefix = jnp.moveaxis(patch.live - patch.ablated, 2, 0)

  def set_prefix(self, delta_prefix: Array) -> None:
    """Senders before a `LayerStart`: their (live - ablated) values are given."""
    if self.patch.weights is not None and self.patch.live is None:
      self.prefix = jnp.moveaxis(delta_prefix, 2, 0)
    self.n = delta_prefix.shape[2]

  def add_senders(self, live: Array) -> None:
    n = live.shape[2]
    self.outputs.append(live)
    if self.patch.weights is not None and self.patch.live is None:
      self.new.append(jnp.moveaxis(live - self.patch.ablated[:, :, self.n:self.n + n], 2, 0))
    self.n += n

  def correction(self, n_up: int, r0: int, nr: int) -> Array:
    """sum_s (1 - w[s, r]) (live_s - ablated_s) over upstream s, receivers r0..r0+nr: [b, p, nr, d].
    """
    # parallel blocks: a layer's heads are not upstream of its MLP
    assert n_up <= self.n, (n_up, self.n)
    coef = 1.0 - self.patch.weights[:, r0:r0 + nr]
    out = 0.0
    n0 = 0
    if self.prefix is not None:
      n0 = self.prefix.shape[0]
      upstream = (np.arange(n0) < n_up)[:, None]
      c = jnp.where(upstream, coef[:n0], 0.0).astype(self.prefix.dtype)
      out = jnp.einsum("sbpd,sr->bprd", self.prefix, c)
    if n_up > n0:
      new = jnp.concatenate(self.new, 0) if len(self.new) > 1 else self.new[0]
      out = out + jnp.einsum("sbpd,sr->bprd", new[:n_up - n0],
                             coef[n0:n_up].astype(new.dtype))
    return out
