"""Rotary position embeddings: every `rope_type` that HF's decoder configs use.

`rope_scaling` (a `ModelConfig` field) holds HF's rope parameters as sorted items, with what HF
derives from the rest of `config.json` filled in at conversion (`original_max_position_embeddings`,
`factor`, `attention_factor`, `max_position_embeddings`), so the forward reads only this dict:

| rope_type | inverse frequencies | depends on the input |
|---|---|---|
| default | `theta^(-2i/dim)` | no |
| linear | default / factor | no |
| llama3 | Llama-3.1's smooth interpolation between factor and 1 by wavelength | no |
| dynamic | default with base `theta * (factor * S / M - (factor - 1))^(dim / (dim - 2))` | yes: S |
| yarn | ramp between interpolation and extrapolation | no |
| longrope | default / `long_factor` if S > original context, else / `short_factor` | yes: S |

yarn and longrope also multiply cos and sin by `attention_factor`.
S is the sequence length `max(positions) + 1` over the batch (HF: `max(position_ids) + 1`; with
right padding HF counts the padding, we count real positions only), M `max_position_embeddings`.
HF's dynamic RoPE is stateful (a module keeps the longest length it has seen); ours is a pure
function of S, equal to a freshly loaded HF model's first call.

Gemma-3's sliding layers use unscaled RoPE with their own base (`rope_local_theta`). A layer's type
is static in the unrolled forward and data (a traced bool) in the scan over blocks.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from .config import ModelConfig

Array = jax.Array

# rope_type -> the keys its parameters may have (any other key would change the math unread).
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "dynamic": ("factor", "max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "long_factor",
                 "short_factor"),
}


def rope_type(cfg: ModelConfig) -> str:
  rs = cfg.rope_scaling_dict
  return rs.get("rope_type", rs.get("type")) or "default"


def _default(theta: float | Array, dim: int) -> Array:
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _yarn(rs: dict[str, Any], theta: float, dim: int) -> Array:
  factor = rs["factor"]
  orig = rs["original_max_position_embeddings"]
  beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

  def corr_dim(rot):
    return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

  low, high = corr_dim(beta_fast), corr_dim(beta_slow)
  if rs.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  pos = theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  extra, inter = 1.0 / pos, 1.0 / (factor * pos)
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  keep = 1 - ramp
  return inter * (1 - keep) + extra * keep


def rotary_inv_freq(cfg: ModelConfig, seq_len: Array | None = None,
                    local: bool = False) -> tuple[Array, float]:
  """(inverse frequencies `[rotary_dim / 2]`, attention factor on cos and sin) of a layer.

  `seq_len` (an int scalar, may be traced) is needed by `dynamic` and `longrope`; `local` selects
  the sliding layers' RoPE when `rope_local_theta` is set."""
  dim = cfg.rotary_dim
  if local and cfg.rope_local_theta is not None:
    return _default(cfg.rope_local_theta, dim), 1.0
  inv = _default(cfg.rope_theta, dim)
  rs = cfg.rope_scaling_dict
  kind = rope_type(cfg)
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
  elif kind == "dynamic":
    factor, m = rs["factor"], rs["max_position_embeddings"]
    s = jnp.maximum(seq_len, m).astype(jnp.float32)
    base = cfg.rope_theta * ((factor * s / m) - (factor - 1)) ** (dim / (dim - 2))
    inv = _default(base, dim)
  elif kind == "yarn":
    return _yarn(rs, cfg.rope_theta, dim), float(rs["attention_factor"])
  elif kind == "longrope":
    shape = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    powers = cfg.rope_theta ** shape
    short = 1.0 / (jnp.asarray(rs["short_factor"], jnp.float32) * powers)
    long = 1.0 / (jnp.asarray(rs["long_factor"], jnp.float32) * powers)
    inv = jnp.where(seq_len > rs["original_max_position_embeddings"], long, short)
    return inv, float(rs["attention_factor"])
  elif kind != "default":
    raise ValueError(f"unsupported rope_type {kind!r} in rope_scaling; supported: "
                     f"{', '.join(ROPE_TYPES)}")
  return inv, 1.0


def seq_len_of(positions: Array) -> Array:
  """S, the sequence length the input-dependent RoPE types read: max(positions) + 1."""
  return jnp.max(positions) + 1


def apply_rotary(x: Array, positions: Array, cfg: ModelConfig, local: bool | Array = False,
                 seq_len: Array | None = None) -> Array:
  """Rotate the first `rotary_dim` dims of x (`[batch, pos, head, d_head]`), rotate-half style.

  `local`: the layer is a sliding layer (static bool, or a traced bool in the scan over blocks).
  `seq_len`: S for `dynamic`/`longrope` (default: from `positions`)."""
  dim = cfg.rotary_dim
  if seq_len is None and rope_type(cfg) in ("dynamic", "longrope"):
    seq_len = seq_len_of(positions)
  if isinstance(local, bool):
    inv, factor = rotary_inv_freq(cfg, seq_len, local)
  else:  # traced: both sets, selected
    inv_l, f_l = rotary_inv_freq(cfg, seq_len, True)
    inv_g, f_g = rotary_inv_freq(cfg, seq_len, False)
    inv = jnp.where(local, inv_l, inv_g)
    factor = f_g if f_l == f_g else jnp.where(local, f_l, f_g)
  angles = positions[..., None].astype(jnp.float32) * inv  # [batch, pos, dim/2]
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if not (isinstance(factor, float) and factor == 1.0):
    cos, sin = cos * factor, sin * factor
  rot, rest = x[..., :dim].astype(jnp.float32), x[..., dim:]
  half = dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], -1)
  out = (rot * cos + rotated * sin).astype(x.dtype)
  return jnp.concatenate([out, rest], -1)
