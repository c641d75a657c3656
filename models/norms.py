"""Normalisation layers: LayerNorm, RMSNorm (plain or Gemma's `(1 + w)`), the identity, and the
per-head qk-norm of Qwen3, Gemma-3 and OLMo-2.

Every norm is computed in at least float32 and cast back to its input's dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ModelConfig
from .sites import Sites

Array = jax.Array


def _wide(x: Array) -> Array:
  """x in at least float32 (norms, softmax and logits are computed at least this wide)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32; or the identity, without params,
  for `normalization="none"` (tracr), for a block's input norms with `pre_norms=False` (OLMo-2:
  `identity=True`), and wherever a norm is applied to an empty params dict (the param-free
  identity: `blk.get("ln1", {})`). The identity's `standardize(x) = (x, 1)` and its gain is 1."""

  cfg: ModelConfig
  identity: bool = False

  def _is_identity(self) -> bool:
    if self.identity or self.cfg.normalization == "none":
      return True
    return not self.is_initializing() and not self.has_variable("params", "w")

  def setup(self):
    d = self.cfg.d_model
    if self._is_identity():
      return
    if self.cfg.normalization == "rmsnorm":
      init = nn.initializers.zeros if self.cfg.rmsnorm_plus_one else nn.initializers.ones
      self.w = self.param("w", init, (d,))
    else:
      self.w = self.param("w", nn.initializers.ones, (d,))
      self.b = self.param("b", nn.initializers.zeros, (d,))

  def gain(self) -> Array:
    """The elementwise gain gamma: `norm(x) = gamma * standardize(x)[0] + beta`."""
    if self._is_identity():
      return jnp.ones((self.cfg.d_model,), jnp.float32)
    w = _wide(self.w)
    return w + 1.0 if self.cfg.normalization == "rmsnorm" and self.cfg.rmsnorm_plus_one else w

  def standardize(self, x: Array) -> tuple[Array, Array]:
    """(x_hat, 1/sigma) with `norm(x) = gamma * x_hat + beta`, x_hat = (x - mean) / sigma
    (LayerNorm) or x / rms (RMSNorm); 1/sigma has shape `[..., 1]`. Float32 or wider."""
    x = _wide(x)
    if self._is_identity():
      return x, jnp.ones(x.shape[:-1] + (1,), x.dtype)
    if self.cfg.normalization == "rmsnorm":
      inv = jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.cfg.norm_eps)
      return x * inv, inv
    inv = jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + self.cfg.norm_eps)
    return (x - jnp.mean(x, -1, keepdims=True)) * inv, inv

  def scale(self, x: Array) -> Array:
    """Multiplier m such that norm(x) = (x - mean) * m (+ bias)."""
    return self.gain() * self.standardize(x)[1]

  def __call__(self, x: Array, sites: Sites | None = None, name: str | None = None) -> Array:
    """The norm of x. With `sites` and the site `name` (e.g. `blocks.0.ln1.hook_scale`) requested,
    the inverse scale 1/sigma (1/rms), Float[Array, "... 1"], passes through that site before it
    multiplies (TransformerLens's `hook_scale` holds sigma itself); `stop_gradient` there freezes
    the norm into a linear map. The site is not visited otherwise, nor by the identity."""
    if self._is_identity():
      return x
    dtype = x.dtype
    xf = _wide(x)
    if self.cfg.normalization == "rmsnorm":
      y = xf * self._scale_at(xf, sites, name)
    else:  # centred before the scale is traced: the program (and its rounding) as without sites
      centred = xf - jnp.mean(xf, -1, keepdims=True)
      y = centred * self._scale_at(xf, sites, name) + self.b.astype(xf.dtype)
    return y.astype(dtype)

  def _scale_at(self, xf: Array, sites: Sites | None, name: str | None) -> Array:
    """`scale(xf)`, its inverse-sigma factor passed through the site `name` when that is asked."""
    if sites is not None and sites.wants(name):
      return self.gain() * sites(name, self.standardize(xf)[1])
    return self.scale(xf)


def qk_norm(cfg: ModelConfig, x: Array, w: Array) -> Array:
  """RMSNorm of queries or keys `[batch, pos, head, d_head]` with weight `w` `[w_heads, d_head]`.

  `cfg.qk_norm == "head"` normalises each head over d_head (Qwen3, Gemma-3: HF's weight is shared
  by the heads, stored here repeated per head); `"all"` over every head at once (OLMo-2: HF
  normalises the whole `[n_heads * d_head]` projection). x may have more heads than w (key/value
  heads repeated per query head, as `ungroup_kv` and per-head inputs do): w is repeated to match,
  which for `"all"` leaves the mean square unchanged (each head counted `rep` times).
  """
  if cfg.qk_norm == "none":
    return x
  if w.shape[0] != x.shape[2]:
    w = jnp.repeat(w, x.shape[2] // w.shape[0], 0)
  xf = _wide(x)
  axes = (-1,) if cfg.qk_norm == "head" else (-2, -1)
  inv = jax.lax.rsqrt(jnp.mean(xf * xf, axes, keepdims=True) + cfg.norm_eps)
  gain = _wide(w) + 1.0 if cfg.rmsnorm_plus_one else _wide(w)
  return (xf * inv * gain).astype(x.dtype)
