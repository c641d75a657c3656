"""Autoencoders and SAEs at a site: encode, edit features, decode (optionally keeping the
reconstruction error)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxinterp.interventions.basic import (
  ALL,
  Array,
  InterventionError,
  Where,
  check_last,
  dims_index,
  source_or_self,
)


@flax.struct.dataclass
class Autoencoder:
  """Encode, swap or edit latents, decode: an autoencoder or SAE intervention, given its weights.

  encode(x) = act((x - b_dec if center else x) @ W_enc + b_enc) with act "relu" (pyvene's
  AutoencoderIntervention, center=True) or "jumprelu" (Gemma Scope / pyvene's JumpReLU SAE:
  pre * (pre > threshold) after a ReLU, center=False); decode(f) = f @ W_dec + b_dec.

  The latents are edited in this order: interchange `latents` (indices; None = all) with the
  source's latents if `source` is given; multiply by `latent_scale`; add `latent_add`. With
  `keep_error`, the SAE's reconstruction error x - decode(encode(x)) is added back, so only the edit
  changes the activation.

  Attributes:
    W_enc: Float[Array, "d n"]; b_enc: Float[Array, "n"]; W_dec: Float[Array, "n d"];
    b_dec: Float[Array, "d"]; threshold: Float[Array, "n"] (jumprelu only).
  """

  W_enc: Array
  b_enc: Array
  W_dec: Array
  b_dec: Array
  threshold: Array = None
  source: Array = None
  latent_scale: Array = None
  latent_add: Array = None
  latents: tuple = flax.struct.field(pytree_node=False, default=None)
  activation: str = flax.struct.field(pytree_node=False, default="relu")
  center: bool = flax.struct.field(pytree_node=False, default=True)
  keep_error: bool = flax.struct.field(pytree_node=False, default=False)
  where: Where = ALL

  trainable = ("W_enc", "b_enc", "W_dec", "b_dec")

  @staticmethod
  def jumprelu(W_enc, b_enc, W_dec, b_dec, threshold, **kw) -> Autoencoder:
    """A JumpReLU SAE (Gemma Scope convention: no decoder-bias centring)."""
    return Autoencoder(W_enc, b_enc, W_dec, b_dec, threshold=threshold, activation="jumprelu",
                       center=False, **kw)

  def _check(self, x: Array) -> int:
    d = x.shape[-1]
    if jnp.ndim(self.W_enc) != 2 or jnp.shape(self.W_enc)[0] != d:
      raise InterventionError(f"Autoencoder: W_enc has shape {jnp.shape(self.W_enc)}, expected "
                              f"({d}, n) for a site of shape {x.shape}")
    n = jnp.shape(self.W_enc)[1]
    for arr, shape, what in ((self.b_enc, (n,), "b_enc"), (self.W_dec, (n, d), "W_dec"),
                             (self.b_dec, (d,), "b_dec")):
      check_last(arr, shape, x, "Autoencoder", what)
    if self.activation not in ("relu", "jumprelu"):
      raise InterventionError(f"Autoencoder: unknown activation {self.activation!r}; use 'relu' or "
                              f"'jumprelu'")
    if self.activation == "jumprelu":
      if self.threshold is None:
        raise InterventionError("Autoencoder: a JumpReLU SAE needs `threshold`")
      check_last(self.threshold, (n,), x, "Autoencoder", "threshold")
    for arr, what in ((self.latent_scale, "latent_scale"), (self.latent_add, "latent_add")):
      if arr is not None:
        try:
          jnp.broadcast_shapes(jnp.shape(arr), (n,))
        except ValueError:
          raise InterventionError(f"Autoencoder: {what} of shape {jnp.shape(arr)} does not "
                                  f"broadcast to the {n} latents") from None
    return n

  def encode(self, x: Array) -> Array:
    """Latents: Float[Array, "... n"]."""
    x = x.astype(jnp.float32)
    if self.center:
      x = x - self.b_dec
    pre = x @ self.W_enc + self.b_enc
    if self.activation == "jumprelu":
      return jnp.where(pre > self.threshold, jax.nn.relu(pre), 0.0)
    return jax.nn.relu(pre)

  def decode(self, f: Array) -> Array:
    return f @ self.W_dec + self.b_dec

  def __call__(self, x: Array) -> Array:
    n = self._check(x)
    f = self.encode(x)
    g = f
    if self.source is not None:
      fs = self.encode(source_or_self(self.source, x, "Autoencoder"))
      if self.latents is None:
        g = fs
      else:
        idx = dims_index(self.latents, n, "Autoencoder latents")
        g = g.at[..., idx].set(fs[..., idx])
    elif self.latents is not None and self.latent_scale is None and self.latent_add is None:
      raise InterventionError("Autoencoder: `latents` given without a source, latent_scale or "
                              "latent_add")
    if self.latent_scale is not None:
      g = g * self.latent_scale
    if self.latent_add is not None:
      g = g + self.latent_add
    out = self.decode(g)
    if self.keep_error:
      out = out + (x.astype(jnp.float32) - self.decode(f))
    return self.where.apply(x, out)
