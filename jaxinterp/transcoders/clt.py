"""Cross-layer transcoders (CLTs): features read at one layer and write to that layer and every
later one (Ameisen et al. 2025, as circuit-tracer's `CrossLayerTranscoder`).

A feature of layer `s` has one encoder row and a decoder vector for each target layer `t >= s`:

  f[s] = act(x[s] @ W_enc[s] + b_enc[s])
  y[t] = b_dec[t] + sum_{s <= t} f[s] @ W_dec[s][:, t - s] (+ x[t] @ W_skip[t])

`W_dec` is ragged (layer `s` has `L - s` targets), so it is a tuple of arrays, itself a pytree.
The skip connection is `x @ W_skip[t]`, circuit-tracer's CLT convention (its PLTs transpose).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxinterp.transcoders.errors import TranscoderError
from jaxinterp.transcoders.plt import Encoder, check_shapes

Array = jax.Array


@flax.struct.dataclass
class CrossLayerTranscoder(Encoder):
  """A cross-layer transcoder over `L` layers with `F` features per layer.

  Attributes:
    W_enc: Float[Array, "L d_model F"].
    b_enc: Float[Array, "L F"].
    W_dec: tuple of L arrays, the s-th Float[Array, "F L-s d_model"] (targets s, s+1, ..., L-1).
    b_dec: Float[Array, "L d_model"].
    threshold: Float[Array, "L F"] (JumpReLU), or None (ReLU).
    W_skip: Float[Array, "L d_model d_model"] applied as `x[t] @ W_skip[t]`, or None.
    input_hook, output_hook, scan: as `PerLayerTranscoders` (static).
  """

  W_enc: Array
  b_enc: Array
  W_dec: tuple
  b_dec: Array
  threshold: Array | None = None
  W_skip: Array | None = None
  input_hook: str = flax.struct.field(pytree_node=False, default="hook_resid_mid")
  output_hook: str = flax.struct.field(pytree_node=False, default="hook_mlp_out")
  scan: str | None = flax.struct.field(pytree_node=False, default=None)

  def validate(self) -> CrossLayerTranscoder:
    """Check that the arrays fit together; return self (TranscoderError otherwise)."""
    if jnp.ndim(self.W_enc) != 3:
      raise TranscoderError(f"cross-layer transcoder: W_enc has shape {jnp.shape(self.W_enc)}, "
                            "expected [n_layers, d_model, d_transcoder]")
    L, d, F = self.W_enc.shape
    check_shapes("cross-layer transcoder", vars(self), {
        "b_enc": (L, F), "b_dec": (L, d), "threshold": (L, F), "W_skip": (L, d, d)})
    if len(self.W_dec) != L:
      raise TranscoderError(f"cross-layer transcoder: {len(self.W_dec)} decoder arrays for {L} "
                            "layers")
    check_shapes("cross-layer transcoder", {f"W_dec[{s}]": w for s, w in enumerate(self.W_dec)},
                 {f"W_dec[{s}]": (F, L - s, d) for s in range(L)})
    return self

  def decode(self, f: Array, x: Array | None = None) -> Array:
    """Each layer's output from every earlier layer's features.

    f: Float[Array, "L ... F"]; x: the inputs (needed with W_skip). Returns [L, ..., d_model].
    """
    if self.W_skip is not None and x is None:
      raise TranscoderError("a cross-layer transcoder with a skip connection needs the inputs x")
    L = self.n_layers
    flat = f.astype(self.dtype).reshape(L, -1, f.shape[-1])
    out = jnp.zeros((L, flat.shape[1], self.d_model), self.dtype) + self.b_dec[:, None, :]
    for s in range(L):
      out = out.at[s:].add(jnp.einsum("nf,ftd->tnd", flat[s], self.W_dec[s]))
    out = out.reshape(f.shape[:-1] + (self.d_model,))
    return out if self.W_skip is None else out + self.skip(x)

  def reconstruct(self, x: Array) -> Array:
    """decode(encode(x), x): Float[Array, "L ... d_model"]."""
    return self.decode(self.encode(x), x)
