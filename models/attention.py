"""Self-attention: projections, qk-norm, rotary, masks (causal, sliding-window, padding, a prefix of
earlier keys), soft-capped scores and softmax, with TransformerLens sites.

Sites (`blocks.{l}.attn.`): `hook_q`, `hook_k`, `hook_v` are the linear projections (before qk-norm
and rotary); with qk-norm, `hook_q_normed` / `hook_k_normed` follow the norm; with rotary,
`hook_rot_q` / `hook_rot_k`; then `hook_attn_scores`, `hook_pattern`, `hook_z`, `hook_result`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from . import rope
from .config import ModelConfig
from .norms import _wide, qk_norm
from .sites import Sites

Array = jax.Array
_init = nn.initializers.normal(0.02)


@flax.struct.dataclass
class KVPrefix:
  """Keys and values of earlier positions, computed by another run, that the queries also attend to
  (as a KV cache does): a forward can then run only the positions after them.

  Attributes:
    k, v: Float[Array, "batch prefix kv_head d_head"], `hook_k` / `hook_v` of those positions
      (keys before qk-norm and rotary). With a leading [n_layers] axis where every block gets one
      (`run_blocks`).
    positions: Int[Array, "batch prefix"], their position ids.
    mask: Bool[Array, "batch prefix"], which of them a query may attend to. They all precede every
      query, so no causal mask applies to them.
  """

  k: Array
  v: Array
  positions: Array
  mask: Array


class Attention(nn.Module):
  """Multi-head (or grouped-query) self-attention with TransformerLens sites; causal unless
  `cfg.causal` is False (then only padded keys are masked)."""

  cfg: ModelConfig
  layer: int

  def setup(self):
    c = self.cfg
    H, K, D, dh = c.n_heads, c.kv_heads, c.d_model, c.d_head
    self.W_Q = self.param("W_Q", _init, (H, D, dh))
    self.W_K = self.param("W_K", _init, (K, D, dh))
    self.W_V = self.param("W_V", _init, (K, D, dh))
    self.W_O = self.param("W_O", _init, (H, dh, D))
    if c.attn_bias:
      self.b_Q = self.param("b_Q", nn.initializers.zeros, (H, dh))
      self.b_K = self.param("b_K", nn.initializers.zeros, (K, dh))
      self.b_V = self.param("b_V", nn.initializers.zeros, (K, dh))
    if c.attn_out_bias:
      self.b_O = self.param("b_O", nn.initializers.zeros, (D,))
    if c.qk_norm != "none":  # per head, so that gathering or repeating heads carries them along
      init = nn.initializers.zeros if c.rmsnorm_plus_one else nn.initializers.ones
      self.q_norm = self.param("q_norm", init, (H, dh))
      self.k_norm = self.param("k_norm", init, (K, dh))

  def project(self, x: Array, W: Array, b: Array | None, split: bool) -> Array:
    if split:  # x: [batch, pos, head, d_model], one input per head
      y = jnp.einsum("bphd,hde->bphe", x, W)
    else:
      y = jnp.einsum("bpd,hde->bphe", x, W)
    return y if b is None else y + b

  def __call__(self, q_in: Array, k_in: Array, v_in: Array, *, positions: Array, key_mask: Array,
               sites: Sites, split: bool, want_result: bool,
               prefix: KVPrefix | None = None,
               local: Array | None = None) -> tuple[Array, Array | None]:
    """Returns (attn_out without post-norm, per-head result or None).

    With `split`, q_in/k_in/v_in are normalised per-head inputs `[batch, pos, head, d_model]`, one
    per query head (GQA key/value weights are repeated, i.e. ungrouped); otherwise all three are the
    same normalised `[batch, pos, d_model]`. `prefix`: keys and values of earlier positions
    (`attend`). `local`: the layer's type as data (`attend`).
    """
    c, layer = self.cfg, self.layer
    p = f"blocks.{layer}.attn."
    rep = c.n_heads // c.kv_heads
    W_K, W_V = self.W_K, self.W_V
    b_K = getattr(self, "b_K", None) if c.attn_bias else None
    b_V = getattr(self, "b_V", None) if c.attn_bias else None
    if split and rep > 1:
      W_K, W_V = jnp.repeat(W_K, rep, 0), jnp.repeat(W_V, rep, 0)
      b_K = None if b_K is None else jnp.repeat(b_K, rep, 0)
      b_V = None if b_V is None else jnp.repeat(b_V, rep, 0)
    q = sites(p + "hook_q", self.project(q_in, self.W_Q, self.b_Q if c.attn_bias else None, split))
    k = sites(p + "hook_k", self.project(k_in, W_K, b_K, split))
    v = sites(p + "hook_v", self.project(v_in, W_V, b_V, split))
    z = self.attend(q, k, v, positions=positions, key_mask=key_mask, sites=sites, prefix=prefix,
                    local=local)
    b_O = self.b_O if c.attn_out_bias else 0.0
    if want_result or sites.wants(p + "hook_result"):
      result = sites(p + "hook_result", jnp.einsum("bphe,hed->bphd", z, self.W_O))
      return result.sum(2) + b_O, result
    return jnp.einsum("bphe,hed->bpd", z, self.W_O) + b_O, None

  def attend(self, q: Array, k: Array, v: Array, *, positions: Array, key_mask: Array,
             sites: Sites, prefix: KVPrefix | None = None, local: Array | None = None) -> Array:
    """The heads' mixed values `hook_z` from projected q, k, v (`[batch, pos, head, d_head]`; k and
    v may have the key/value heads of GQA): qk-norm, rotary, scaled (soft-capped) scores, the
    causal, sliding-window and padding masks, softmax.

    With `prefix`, the queries also attend to the prefix's keys and values, placed before the
    positions of q (`positions` are then the queries' own ids, contiguous per row), and the score
    and pattern sites have the prefix's keys first. `local`: whether this is a sliding layer, as a
    traced bool (the scan over blocks with `cfg.layer_types_as_data`); None reads it from
    `cfg.sliding_layers` statically."""
    c, layer = self.cfg, self.layer
    p = f"blocks.{layer}.attn."
    if local is None:
      is_local = layer in c.sliding_layers
      sliding = bool(c.sliding_window) and is_local
    else:
      is_local = local
      sliding = bool(c.sliding_window)
    if c.qk_norm != "none":
      q = sites(p + "hook_q_normed", qk_norm(c, q, self.q_norm))
      k = sites(p + "hook_k_normed", qk_norm(c, k, self.k_norm))
    seq_len = None
    if c.positional == "rotary":
      if rope.rope_type(c) in ("dynamic", "longrope"):
        seq_len = rope.seq_len_of(positions)
      q = sites(p + "hook_rot_q", rope.apply_rotary(q, positions, c, is_local, seq_len))
      k = sites(p + "hook_rot_k", rope.apply_rotary(k, positions, c, is_local, seq_len))
    P = q.shape[1]
    qi, ki = jnp.arange(P)[:, None], jnp.arange(P)[None, :]
    allowed = ki <= qi if c.causal else jnp.ones((P, P), bool)
    if sliding:
      near = qi - ki < c.sliding_window
      allowed = allowed & (near if local is None else (near | ~local))
    allowed = allowed[None] & key_mask[:, None, :]  # [batch, query, key]
    if prefix is not None:
      kp = prefix.k
      if c.qk_norm != "none":
        kp = qk_norm(c, kp, self.k_norm)
      if c.positional == "rotary":
        kp = rope.apply_rotary(kp, prefix.positions, c, is_local, seq_len)
      k = jnp.concatenate([kp.astype(k.dtype), k], 1)
      v = jnp.concatenate([prefix.v.astype(v.dtype), v], 1)
      before = jnp.broadcast_to(prefix.mask[:, None, :], (q.shape[0], P, kp.shape[1]))
      if sliding:
        near = positions[:, :, None] - prefix.positions[:, None, :] < c.sliding_window
        before = before & (near if local is None else (near | ~local))
      allowed = jnp.concatenate([before, allowed], -1)
    if k.shape[2] != q.shape[2]:
      rep = q.shape[2] // k.shape[2]
      k, v = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
    scale = c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(c.d_head)
    scores = jnp.einsum("bqhe,bkhe->bhqk", _wide(q), _wide(k)) * scale
    if c.attn_logit_softcap:
      scores = jnp.tanh(scores / c.attn_logit_softcap) * c.attn_logit_softcap
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
    scores = sites(p + "hook_attn_scores", scores)
    pattern = sites(p + "hook_pattern", jax.nn.softmax(scores, -1)).astype(v.dtype)
    return sites(p + "hook_z", jnp.einsum("bhqk,bkhe->bqhe", pattern, v))
