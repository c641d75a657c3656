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

from typing import Optional

import flax.struct
import jax

from .config import ModelConfig


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

  weights: Optional[jax.Array]
  ablated: Optional[jax.Array]
  live: Optional[jax.Array] = None
