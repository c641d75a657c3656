"""One decoder-only transformer in Flax Linen, written to be used as a pure function.

`forward(cfg, params, tokens, ...)` is `Transformer(cfg).apply({"params": params}, ...)`: the params are
a plain nested dict of arrays, interventions and edge weights are explicit arguments, and the only
outputs are the logits and (optionally) the collected activations. `jit`, `grad` and `vmap` apply to
every array argument.

Parameter names follow TransformerLens (`W_Q: [head, d_model, d_head]`, `W_O: [head, d_head,
d_model]`, `W_in: [d_model, d_mlp]`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import edges as E
from .config import ModelConfig
from .sites import Sites

Array = jax.Array
_init = nn.initializers.normal(0.02)


def _wide(x: Array) -> Array:
  """x in at least float32 (norms, softmax and logits are computed at least this wide)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def activation(name: str, x: Array) -> Array:
  if name == "gelu_new" or name == "gelu_pytorch_tanh":
    return jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "silu":
    return jax.nn.silu(x)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"unknown activation {name!r}")


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32; or the identity, without params
  (`normalization="none"`, tracr), for which `standardize(x) = (x, 1)` and the gain is 1."""

  cfg: ModelConfig

  def setup(self):
    d = self.cfg.d_model
    if self.cfg.normalization == "none":
      return
    if self.cfg.normalization == "rmsnorm":
      init = nn.initializers.zeros if self.cfg.rmsnorm_plus_one else nn.initializers.ones
      self.w = self.param("w", init, (d,))
    else:
      self.w = self.param("w", nn.initializers.ones, (d,))
      self.b = self.param("b", nn.initializers.zeros, (d,))

  def gain(self) -> Array:
    """The elementwise gain gamma: `norm(x) = gamma * standardize(x)[0] + beta`."""
    if self.cfg.normalization == "none":
      return jnp.ones((self.cfg.d_model,), jnp.float32)
    w = _wide(self.w)
    return w + 1.0 if self.cfg.normalization == "rmsnorm" and self.cfg.rmsnorm_plus_one else w

  def standardize(self, x: Array) -> tuple[Array, Array]:
    """(x_hat, 1/sigma) with `norm(x) = gamma * x_hat + beta`, x_hat = (x - mean) / sigma (LayerNorm)
    or x / rms (RMSNorm); 1/sigma has shape `[..., 1]`. Float32 or wider."""
    x = _wide(x)
    if self.cfg.normalization == "none":
      return x, jnp.ones(x.shape[:-1] + (1,), x.dtype)
    if self.cfg.normalization == "rmsnorm":
      inv = jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.cfg.norm_eps)
      return x * inv, inv
    inv = jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + self.cfg.norm_eps)
    return (x - jnp.mean(x, -1, keepdims=True)) * inv, inv

  def scale(self, x: Array) -> Array:
    """Multiplier m such that norm(x) = (x - mean) * m (+ bias)."""
    return self.gain() * self.standardize(x)[1]

  def __call__(self, x: Array) -> Array:
    if self.cfg.normalization == "none":
      return x
    dtype = x.dtype
    xf = _wide(x)
    if self.cfg.normalization == "rmsnorm":
      y = xf * self.scale(xf)
    else:
      y = (xf - jnp.mean(xf, -1, keepdims=True)) * self.scale(xf) + self.b.astype(xf.dtype)
    return y.astype(dtype)


def rotary_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse frequencies for RoPE, including Llama-3 frequency scaling."""
  dim = cfg.rotary_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  rs = cfg.rope_scaling_dict
  kind = rs.get("rope_type", rs.get("type"))
  if kind == "llama3":
    factor = rs["factor"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(medium, smoothed, scaled)
  elif kind == "linear":
    inv = inv / rs["factor"]
  elif kind not in (None, "default"):
    raise ValueError(f"unsupported rope scaling {kind!r}")
  return inv


def apply_rotary(x: Array, positions: Array, cfg: ModelConfig) -> Array:
  """Rotate the first `rotary_dim` dims of x (`[batch, pos, head, d_head]`), rotate-half style."""
  dim = cfg.rotary_dim
  inv = rotary_inv_freq(cfg)
  angles = positions[..., None].astype(jnp.float32) * inv  # [batch, pos, dim/2]
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  rot, rest = x[..., :dim].astype(jnp.float32), x[..., dim:]
  half = dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], -1)
  out = (rot * cos + rotated * sin).astype(x.dtype)
  return jnp.concatenate([out, rest], -1)


@flax.struct.dataclass
class KVPrefix:
  """Keys and values of earlier positions, computed by another run, that the queries also attend to
  (as a KV cache does): a forward can then run only the positions after them.

  Attributes:
    k, v: Float[Array, "batch prefix kv_head d_head"], `hook_k` / `hook_v` of those positions
      (keys before rotary). With a leading [n_layers] axis where every block gets one
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

  def project(self, x: Array, W: Array, b: Optional[Array], split: bool) -> Array:
    if split:  # x: [batch, pos, head, d_model], one input per head
      y = jnp.einsum("bphd,hde->bphe", x, W)
    else:
      y = jnp.einsum("bpd,hde->bphe", x, W)
    return y if b is None else y + b

  def __call__(self, q_in: Array, k_in: Array, v_in: Array, *, positions: Array, key_mask: Array,
               sites: Sites, split: bool, want_result: bool,
               prefix: Optional[KVPrefix] = None) -> tuple[Array, Optional[Array]]:
    """Returns (attn_out without post-norm, per-head result or None).

    With `split`, q_in/k_in/v_in are normalised per-head inputs `[batch, pos, head, d_model]`, one per
    query head (GQA key/value weights are repeated, i.e. ungrouped); otherwise all three are the same
    normalised `[batch, pos, d_model]`. `prefix`: keys and values of earlier positions (`attend`).
    """
    c, l = self.cfg, self.layer
    p = f"blocks.{l}.attn."
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
    z = self.attend(q, k, v, positions=positions, key_mask=key_mask, sites=sites, prefix=prefix)
    b_O = self.b_O if c.attn_out_bias else 0.0
    if want_result or sites.wants(p + "hook_result"):
      result = sites(p + "hook_result", jnp.einsum("bphe,hed->bphd", z, self.W_O))
      return result.sum(2) + b_O, result
    return jnp.einsum("bphe,hed->bpd", z, self.W_O) + b_O, None

  def attend(self, q: Array, k: Array, v: Array, *, positions: Array, key_mask: Array,
             sites: Sites, prefix: Optional[KVPrefix] = None) -> Array:
    """The heads' mixed values `hook_z` from projected q, k, v (`[batch, pos, head, d_head]`; k and
    v may have the key/value heads of GQA): rotary, scaled (soft-capped) scores, the causal,
    sliding-window and padding masks, softmax.

    With `prefix`, the queries also attend to the prefix's keys and values, placed before the
    positions of q (`positions` are then the queries' own ids, contiguous per row), and the score
    and pattern sites have the prefix's keys first."""
    c, l = self.cfg, self.layer
    p = f"blocks.{l}.attn."
    if c.positional == "rotary":
      q = sites(p + "hook_rot_q", apply_rotary(q, positions, c))
      k = sites(p + "hook_rot_k", apply_rotary(k, positions, c))
    P = q.shape[1]
    qi, ki = jnp.arange(P)[:, None], jnp.arange(P)[None, :]
    allowed = ki <= qi if c.causal else jnp.ones((P, P), bool)
    sliding = bool(c.sliding_window) and l in c.sliding_layers
    if sliding:
      allowed = allowed & (qi - ki < c.sliding_window)
    allowed = allowed[None] & key_mask[:, None, :]  # [batch, query, key]
    if prefix is not None:
      kp = prefix.k
      if c.positional == "rotary":
        kp = apply_rotary(kp, prefix.positions, c)
      k = jnp.concatenate([kp.astype(k.dtype), k], 1)
      v = jnp.concatenate([prefix.v.astype(v.dtype), v], 1)
      before = jnp.broadcast_to(prefix.mask[:, None, :], (q.shape[0], P, kp.shape[1]))
      if sliding:
        before = before & (positions[:, :, None] - prefix.positions[:, None, :] < c.sliding_window)
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


class MLP(nn.Module):
  cfg: ModelConfig
  layer: int

  def setup(self):
    c = self.cfg
    self.W_in = self.param("W_in", _init, (c.d_model, c.d_mlp))
    if c.gated_mlp:
      self.W_gate = self.param("W_gate", _init, (c.d_model, c.d_mlp))
    self.W_out = self.param("W_out", _init, (c.d_mlp, c.d_model))
    if c.mlp_bias:
      self.b_in = self.param("b_in", nn.initializers.zeros, (c.d_mlp,))
      self.b_out = self.param("b_out", nn.initializers.zeros, (c.d_model,))

  def __call__(self, x: Array, sites: Sites) -> Array:
    c, p = self.cfg, f"blocks.{self.layer}.mlp."
    b_in = self.b_in if c.mlp_bias else 0.0
    b_out = self.b_out if c.mlp_bias else 0.0
    if c.gated_mlp:
      pre = sites(p + "hook_pre", x @ self.W_gate)
      pre_linear = sites(p + "hook_pre_linear", x @ self.W_in + b_in)
      post = activation(c.act_fn, pre) * pre_linear
    else:
      post = activation(c.act_fn, sites(p + "hook_pre", x @ self.W_in + b_in))
    post = sites(p + "hook_post", post)
    return post @ self.W_out + b_out


class Block(nn.Module):
  cfg: ModelConfig
  layer: int

  def setup(self):
    c = self.cfg
    self.ln1 = Norm(c)
    self.ln2 = Norm(c)
    if c.post_norms:
      self.ln1_post = Norm(c)
      self.ln2_post = Norm(c)
    self.attn = Attention(c, self.layer)
    self.mlp = MLP(c, self.layer)

  def __call__(self, resid: Array, positions: Array, key_mask: Array, sites: Sites,
               graph: Optional["_GraphState"], prefix: Optional[KVPrefix] = None) -> Array:
    c, l = self.cfg, self.layer
    p = f"blocks.{l}."
    resid_pre = sites(p + "hook_resid_pre", resid)

    # Attention inputs: per head (split) when a per-head input site or the edge weights ask for it
    # (a graph that only records the senders needs no per-head inputs).
    weighted = graph is not None and graph.patch.weights is not None
    split = weighted or any(sites.wants(p + f"hook_{x}_input") for x in "qkv")
    if split:
      H = c.n_heads
      if weighted:
        corr = graph.correction(E.n_upstream_of_attn(c, l), E.head_receiver(c, l, 0, "q"), 3 * H)
        ins = [resid_pre[:, :, None, :] - corr[:, :, i * H:(i + 1) * H] for i in range(3)]
      else:
        ins = [jnp.broadcast_to(resid_pre[:, :, None, :], resid_pre.shape[:2] + (H, c.d_model))] * 3
      ins = [sites(p + f"hook_{x}_input", a) for x, a in zip("qkv", ins)]
      q_in, k_in, v_in = [self.ln1(a) for a in ins]
    else:
      q_in = k_in = v_in = sites(p + "ln1.hook_normalized", self.ln1(resid_pre))

    want_result = graph is not None
    attn_out, result = self.attn(q_in, k_in, v_in, positions=positions, key_mask=key_mask,
                                 sites=sites, split=split, want_result=want_result, prefix=prefix)
    if c.post_norms:
      if result is not None:  # post-norm is linear given its scale: split it over the heads
        result = result * self.ln1_post.scale(attn_out)[:, :, None, :].astype(result.dtype)
      attn_out = self.ln1_post(attn_out)
    attn_out = sites(p + "hook_attn_out", attn_out)
    if graph is not None:
      graph.add_senders(result)

    if c.parallel_attn_mlp:
      mlp_resid = resid_pre
    else:
      mlp_resid = sites(p + "hook_resid_mid", resid_pre + attn_out)
    if weighted:
      corr = graph.correction(E.n_upstream_of_mlp(c, l), E.mlp_receiver(c, l), 1)
      mlp_in = mlp_resid - corr[:, :, 0]
    else:
      mlp_in = mlp_resid
    mlp_in = sites(p + "ln2.hook_normalized", self.ln2(mlp_in))
    mlp_out = self.mlp(mlp_in, sites)
    if c.post_norms:
      mlp_out = self.ln2_post(mlp_out)
    mlp_out = sites(p + "hook_mlp_out", mlp_out)
    if graph is not None:
      graph.add_senders(mlp_out[:, :, None, :])
    if c.parallel_attn_mlp:
      return sites(p + "hook_resid_post", resid_pre + attn_out + mlp_out)
    return sites(p + "hook_resid_post", mlp_resid + mlp_out)


@flax.struct.dataclass
class LayerStart:
  """Start the forward at block `layer` from a known residual stream (e.g. cached from a clean run).

  Attributes:
    layer: the first block to run (static); `n_layers` runs only the final norm and unembedding.
    resid: Float[Array, "batch pos d_model"], the residual stream entering that block.
    delta_prefix: in the graph form, Float[Array, "batch pos n_up d_model"]: (live - ablated) of the
      senders before that block, n_up = `edges.n_upstream_of_attn(cfg, layer)`.
    positions: None, or Int[Array, "batch pos"], the position ids of resid's positions (with
      `kv_prefix`: each row's positions after its prefix).
    kv_prefix: None, or a `KVPrefix` with a leading [n_layers] axis: every block from `layer` on
      also attends to its layer's keys and values of earlier positions (as `run_blocks(prefix=)`).
  """

  layer: int = flax.struct.field(pytree_node=False)
  resid: Array
  delta_prefix: Optional[Array] = None
  positions: Optional[Array] = None
  kv_prefix: Optional[KVPrefix] = None


class _GraphState:
  """Running state of one graph-form forward: the senders' (live - ablated) differences.

  Kept sender-major (`[sender, batch, pos, d_model]`) in two parts: a `prefix` that is the same for
  every vmapped copy of the forward (the fixed differences when `EdgePatch.live` is given, as in
  attribution, or those of the senders before a `LayerStart`), and the per-layer differences this
  run computes itself. Under `vmap` over edge weights only the second part is per copy, and under
  `grad` the backward pass keeps a single copy of the prefix.
  """

  def __init__(self, patch: E.EdgePatch):
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
    """sum_s (1 - w[s, r]) (live_s - ablated_s) over upstream s, receivers r0..r0+nr: [b, p, nr, d]."""
    assert n_up <= self.n, (n_up, self.n)  # parallel blocks: a layer's heads are not upstream of its MLP
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


class Transformer(nn.Module):
  """The decoder. Call through `forward`, which builds the per-call `Sites`."""

  cfg: ModelConfig
  remat: bool = False

  def setup(self):
    c = self.cfg
    self.W_E = self.param("W_E", _init, (c.d_vocab, c.d_model))
    if c.positional == "learned":
      self.W_pos = self.param("W_pos", _init, (c.n_ctx, c.d_model))
    # With remat, each block's activations are recomputed in the backward pass (sites and the graph
    # state are static side inputs, hashed by identity).
    block_cls = nn.remat(Block, static_argnums=(4, 5)) if self.remat else Block
    self.blocks = [block_cls(c, l, name=f"blocks_{l}") for l in range(c.n_layers)]
    self.ln_final = Norm(c)
    if not c.tied_embeddings:
      self.W_U = self.param("W_U", _init, (c.d_model, c.vocab_out))
    if c.unembed_bias:
      self.b_U = self.param("b_U", nn.initializers.zeros, (c.vocab_out,))

  def __call__(self, tokens: Array, attention_mask: Optional[Array], sites: Sites,
               edges: Optional[E.EdgePatch] = None, embed_override: Optional[Array] = None,
               start: Optional["LayerStart"] = None) -> Array:
    c = self.cfg
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, bool)
    key_mask = attention_mask.astype(bool)
    positions = positions_of(key_mask)
    graph = _GraphState(edges) if edges is not None else None
    first, kv_prefix = 0, None
    if start is not None:  # continue a run whose layers before start.layer are known
      first, resid, kv_prefix = start.layer, start.resid, start.kv_prefix
      if start.positions is not None:
        positions = start.positions
      if graph is not None:
        graph.set_prefix(start.delta_prefix)
    else:
      if embed_override is not None:  # e.g. interpolated input embeddings for EAP-IG
        resid = embed_override
      else:
        resid = self.embed(tokens, attention_mask, sites)
      if graph is not None:
        graph.add_senders(resid[:, :, None, :])
    for l in range(first, c.n_layers):
      kv = None if kv_prefix is None else jax.tree.map(lambda a: a[l], kv_prefix)
      resid = self.blocks[l](resid, positions, key_mask, sites, graph, kv)
    if graph is not None:
      if edges.weights is not None:
        resid = resid - graph.correction(E.n_senders(c), E.logits_receiver(c), 1)[:, :, 0]
      if sites.wants("hook_senders"):  # every sender's output in this run: [batch, pos, sender, d]
        sites("hook_senders", jnp.concatenate(graph.outputs, 2))
    x = sites("ln_final.hook_normalized", self.ln_final(resid))
    W_U = self.W_E.T if c.tied_embeddings else self.W_U
    logits = _wide(x @ W_U)
    if c.unembed_bias:
      logits = logits + self.b_U
    if c.final_logit_softcap:
      logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
    return logits

  def embed(self, tokens: Array, attention_mask: Optional[Array] = None,
            sites: Optional[Sites] = None) -> Array:
    """The input node's output (token + position embedding): `[batch, pos, d_model]`."""
    c = self.cfg
    sites = sites if sites is not None else Sites()
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, bool)
    positions = positions_of(attention_mask)
    x = self.W_E[tokens]
    if c.embed_scale != 1.0:
      x = x * jnp.asarray(c.embed_scale, x.dtype)
    x = sites("hook_embed", x)
    if c.positional == "learned":
      x = x + sites("hook_pos_embed", self.W_pos[positions])
    return x


def forward(cfg: ModelConfig, params: Mapping[str, Any], tokens: Array, *,
            attention_mask: Optional[Array] = None,
            interventions: Optional[Mapping[str, Any]] = None,
            collect: Iterable[str] = (),
            edges: Optional[E.EdgePatch] = None,
            input_embeds: Optional[Array] = None,
            remat: bool = False,
            start: Optional[LayerStart] = None):
  """The model as a pure function.

  Args:
    cfg: the architecture (static).
    params: nested dict of arrays, as returned by `from_pretrained(...).params`.
    tokens: Int[Array, "batch pos"].
    attention_mask: Bool[Array, "batch pos"]; False marks padding (right padding keeps the logits at
      real positions unchanged).
    interventions: site name -> callable `x -> x'` (see `jaxinterp.interventions`), applied in order.
    collect: site names whose (post-intervention) values are returned.
    edges: an `EdgePatch` for the graph-form forward (edge weights as an argument). The site
      `hook_senders` (`[batch, pos, sender, d_model]`, every sender's output) exists only then.
    input_embeds: Float[Array, "batch pos d_model"]; replaces the input node's output (token plus
      position embedding), e.g. interpolated embeddings for EAP-IG.
    remat: rematerialise each block in the backward pass (saves memory under `grad`).
    start: a `LayerStart` to skip the blocks before a layer whose input is already known (exact
      patching reuses the clean run's upstream activations this way).

  Returns:
    logits Float[Array, "batch pos vocab"] if `collect` is empty, else (logits, {site: value}).
  """
  sites = Sites(interventions, collect)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, pos], got shape {tokens.shape}")

  if remat and sites.collect:
    raise ValueError("remat=True cannot be combined with collect (collected values would be "
                     "recomputed inside the backward pass)")
  if remat and edges is not None and edges.weights is not None and edges.live is None:
    raise ValueError("remat=True needs EdgePatch.live (fixed sender values), as attribution uses")
  logits = Transformer(cfg, remat).apply({"params": params}, tokens, attention_mask, sites, edges,
                                         input_embeds, start)
  sites.check_all_visited()
  if sites.collect:
    return logits, dict(sites.cache)
  return logits


def last_token_logits(cfg: ModelConfig, params: Mapping[str, Any], x: Array, last: Array) -> Array:
  """Unembed only each example's last real position: Float[Array, "batch 1 vocab"] (float32).

  x is `ln_final.hook_normalized` [batch, pos, d_model]. Every task metric reads the logits at
  `batch.last` only, so the metric can be applied to these with `last = 0`. This skips the
  [batch*pos, d_model] x [d_model, vocab] unembedding (and its transpose in the backward pass), which
  for GPT-2 small at 24 positions is ~30% of a forward's FLOPs.
  """
  xl = jnp.take_along_axis(x, last[:, None, None].astype(jnp.int32), axis=1)  # [b, 1, d]
  W_U = params["W_E"].T if cfg.tied_embeddings else params["W_U"]
  logits = (xl @ W_U).astype(jnp.promote_types(xl.dtype, jnp.float32))
  if cfg.unembed_bias:
    logits = logits + params["b_U"]
  if cfg.final_logit_softcap:
    logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
  return logits


def embed_inputs(cfg: ModelConfig, params: Mapping[str, Any], tokens: Array,
                 attention_mask: Optional[Array] = None) -> Array:
  """Output of the `input` node: Float[Array, "batch pos d_model"]."""
  return Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), attention_mask,
                                method=Transformer.embed)


def init_params(cfg: ModelConfig, key: Array, dtype=jnp.float32) -> dict[str, Any]:
  """Random parameters (normal(0.02) weights, unit norms) for a config."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = Transformer(cfg).init(key, tokens, None, Sites())["params"]
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), dict(params))


def site_names(cfg: ModelConfig) -> list[str]:
  """Every site name the forward can expose, in execution order (optional ones included).

  Requesting a per-head `hook_{q,k,v}_input` switches that layer to split inputs, in which case its
  `ln1.hook_normalized` is not visited.
  """
  names = ["hook_embed"] + (["hook_pos_embed"] if cfg.positional == "learned" else [])
  for l in range(cfg.n_layers):
    p = f"blocks.{l}."
    names += [p + "hook_resid_pre"] + [p + f"hook_{x}_input" for x in "qkv"]
    names += [p + "ln1.hook_normalized"]
    names += [p + "attn." + s for s in ("hook_q", "hook_k", "hook_v")]
    if cfg.positional == "rotary":
      names += [p + "attn.hook_rot_q", p + "attn.hook_rot_k"]
    names += [p + "attn." + s for s in ("hook_attn_scores", "hook_pattern", "hook_z", "hook_result")]
    names += [p + "hook_attn_out"]
    if not cfg.parallel_attn_mlp:
      names += [p + "hook_resid_mid"]
    names += [p + "ln2.hook_normalized", p + "mlp.hook_pre"]
    if cfg.gated_mlp:
      names += [p + "mlp.hook_pre_linear"]
    names += [p + "mlp.hook_post", p + "hook_mlp_out", p + "hook_resid_post"]
  return names + ["ln_final.hook_normalized"]


def ungroup_kv(cfg: ModelConfig, params: Mapping[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
  """The same model with one key/value head per query head (GQA weights repeated, MHA unchanged).

  The logits are unchanged; every query head then has its own `hook_k`/`hook_v` (as TransformerLens's
  `ungroup_grouped_query_attention`), which is how the edge graph treats GQA models.
  """
  rep = cfg.n_heads // cfg.kv_heads
  if rep == 1:
    return cfg, params
  params = dict(params)
  for l in range(cfg.n_layers):
    blk = dict(params[f"blocks_{l}"])
    attn = dict(blk["attn"])
    for name in ("W_K", "W_V", "b_K", "b_V"):
      if name in attn:
        attn[name] = jnp.repeat(attn[name], rep, 0)
    blk["attn"] = attn
    params[f"blocks_{l}"] = blk
  return dataclasses.replace(cfg, n_kv_heads=None), params


def layers_uniform(cfg: ModelConfig) -> bool:
  """Whether every block has the same static structure (so the blocks can run as one `lax.scan`).

  Gemma-2's alternating sliding-window layers are the exception.
  """
  return not cfg.sliding_layers or set(cfg.sliding_layers) == set(range(cfg.n_layers))


def stack_blocks(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, Any]:
  """The blocks' params stacked on a leading layer axis (a copy), for `run_blocks`."""
  blocks = [params[f"blocks_{l}"] for l in range(cfg.n_layers)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def positions_of(attention_mask: Array) -> Array:
  """Position ids of right-padded rows: Int[Array, "batch pos"] (0 at padding's left edge)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), -1) - 1, 0)


def run_blocks(cfg: ModelConfig, params: Mapping[str, Any], resid: Array, attention_mask: Array,
               interventions: Optional[Mapping[str, Any]] = None, collect: Iterable[str] = (),
               record_senders: bool = False, stacked: Optional[Mapping[str, Any]] = None,
               positions: Optional[Array] = None, prefix: Optional[KVPrefix] = None):
  """Run every block on a residual stream, with per-layer interventions given as stacked pytrees.

  With `stacked` (`stack_blocks(cfg, params)`, for configs whose blocks share one structure) the
  blocks run as one `lax.scan`, compiled once instead of once per layer (much faster compiles; costs
  a copy of the block weights). Without it they run one after the other from `params`.

  Args:
    resid: Float[Array, "batch pos d_model"], the residual stream entering block 0.
    attention_mask: Bool[Array, "batch pos"].
    interventions: site name *within a block* (e.g. `"attn.hook_q"`, `"hook_resid_post"`) -> an
      intervention pytree whose array leaves have a leading `[n_layers]` axis (layer l applies
      slice l).
    collect: site names within a block to return, stacked over layers.
    record_senders: also return "hook_senders", each block's sender outputs as the graph form
      records them ([n_layers, batch, pos, n_heads + 1, d_model]: the heads' results, then the MLP).
    positions: Int[Array, "batch pos"] position ids of resid's positions (default: those of right
      padding from 0); with `prefix`, where each row's positions start after its prefix.
    prefix: a `KVPrefix` whose arrays have a leading [n_layers] axis: every block's queries also
      attend to that layer's keys and values of earlier positions, so resid may hold only the
      positions after them.

  Returns:
    (Float[Array, "batch pos d_model"] residual after the last block, {name: [n_layers, ...]}).
  """
  key_mask = attention_mask.astype(bool)
  positions = positions_of(key_mask) if positions is None else positions
  collect = tuple(collect)
  interventions = dict(interventions or {})

  def one(layer, p_l, x, iv_l, kv_l):
    name = f"blocks.{layer}."
    sites = Sites({name + k: v for k, v in iv_l.items()}, [name + k for k in collect])
    graph = _GraphState(E.EdgePatch(None, None)) if record_senders else None
    x = Block(cfg, layer).apply({"params": p_l}, x, positions, key_mask, sites, graph, kv_l)
    sites.check_all_visited()
    ys = {k: sites.cache[name + k] for k in collect}
    if record_senders:
      ys["hook_senders"] = jnp.concatenate(graph.outputs, 2)
    return x, ys

  if stacked is not None:
    if not layers_uniform(cfg):
      raise ValueError("scanned blocks need one block structure; this config's sliding-window "
                       "layers differ from its other layers (pass stacked=None)")
    return jax.lax.scan(lambda x, xs: one(0, xs[0], x, xs[1], xs[2]), resid,
                        (stacked, interventions, prefix))
  per_layer = []
  for l in range(cfg.n_layers):
    at = lambda tree: jax.tree.map(lambda a: a[l], tree)
    resid, ys = one(l, params[f"blocks_{l}"], resid, at(interventions), at(prefix))
    per_layer.append(ys)
  return resid, jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer[0] else {}


def sender_outputs(cfg: ModelConfig, params, tokens: Array, mask: Optional[Array] = None,
                   **kw) -> Array:
  """Every sender's output (input node, heads, MLPs): Float[Array, "batch pos sender d_model"]."""
  _, cache = forward(cfg, params, tokens, attention_mask=mask, edges=E.EdgePatch(None, None),
                     collect=("hook_senders",), **kw)
  return cache["hook_senders"]
