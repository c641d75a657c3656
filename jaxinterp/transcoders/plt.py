"""Per-layer transcoders (PLTs): one sparse MLP replacement per layer, stacked into one pytree.

Layer `l`'s transcoder reads the layer's input site (e.g. `blocks.l.ln2.hook_normalized`) and writes
its output site (e.g. `blocks.l.hook_mlp_out`):

  f = act(x @ W_enc[l] + b_enc[l])               act: ReLU, or JumpReLU with `threshold[l]`
  y = f @ W_dec[l] + b_dec[l] (+ x @ W_skip[l])  the optional linear skip connection

Weights use the `x @ W` convention throughout (`W_enc [d_model, F]`, as Gemma Scope's `params.npz`);
circuit-tracer's safetensors hold `W_enc [F, d_model]` and a PLT's `W_skip` as `x @ W_skip.T`, which
`loading` and `saving` transpose.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxinterp.transcoders import activations
from jaxinterp.transcoders.errors import TranscoderError

Array = jax.Array


def check_shapes(what: str, arrays: dict[str, Array | None],
                 shapes: dict[str, tuple[int, ...]]) -> None:
  """Raise a one-line TranscoderError naming the first array whose shape is not the expected one."""
  for name, shape in shapes.items():
    a = arrays.get(name)
    if a is not None and tuple(jnp.shape(a)) != shape:
      raise TranscoderError(f"{what}: {name} has shape {tuple(jnp.shape(a))}, expected {shape}")


class Encoder:
  """What a transcoder set's encoder (`W_enc` [L, d_model, F], `b_enc`, `threshold`) and skip
  connection (`W_skip`) give, shared by `PerLayerTranscoders` and `clt.CrossLayerTranscoder`: their
  sizes, the feature activations and the skip output. Only their decoders differ."""

  @property
  def n_layers(self) -> int:
    return self.W_enc.shape[0]

  @property
  def d_model(self) -> int:
    return self.W_enc.shape[1]

  @property
  def d_transcoder(self) -> int:
    return self.W_enc.shape[2]

  @property
  def activation(self) -> str:
    """"jumprelu" or "relu"."""
    return "relu" if self.threshold is None else "jumprelu"

  @property
  def dtype(self):
    return self.W_enc.dtype

  def astype(self, dtype):
    """The same set with every array in `dtype` (e.g. jnp.bfloat16)."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), self)

  def encode(self, x: Array, bandwidth: float = 1e-3) -> Array:
    """Feature activations. x: Float[Array, "L ... d_model"] -> Float[Array, "L ... F"]."""
    return activations.encode(self.W_enc, self.b_enc, self.threshold, x, bandwidth)

  def skip(self, x: Array) -> Array:
    """The skip connection's output (zeros without one). x: [L, ..., d_model] -> same shape."""
    if self.W_skip is None:
      return jnp.zeros(x.shape, self.dtype)
    flat = x.astype(self.dtype).reshape(x.shape[0], -1, x.shape[-1])
    return jnp.einsum("lnd,lde->lne", flat, self.W_skip).reshape(x.shape)


@flax.struct.dataclass
class PerLayerTranscoders(Encoder):
  """A set of per-layer transcoders, one per layer, all with `F` features.

  Attributes:
    W_enc: Float[Array, "L d_model F"].
    b_enc: Float[Array, "L F"].
    W_dec: Float[Array, "L F d_model"].
    b_dec: Float[Array, "L d_model"].
    threshold: Float[Array, "L F"] (JumpReLU), or None (ReLU).
    W_skip: Float[Array, "L d_model d_model"] applied as `x @ W_skip[l]`, or None.
    input_hook: circuit-tracer's `feature_input_hook` (`hooks.INPUT_HOOKS`), static.
    output_hook: circuit-tracer's `feature_output_hook` (`hooks.OUTPUT_HOOKS`), static.
    scan: the identifier circuit-tracer and Neuronpedia use for the set, static (None: unnamed).
  """

  W_enc: Array
  b_enc: Array
  W_dec: Array
  b_dec: Array
  threshold: Array | None = None
  W_skip: Array | None = None
  input_hook: str = flax.struct.field(pytree_node=False, default="mlp.hook_in")
  output_hook: str = flax.struct.field(pytree_node=False, default="hook_mlp_out")
  scan: str | None = flax.struct.field(pytree_node=False, default=None)

  def validate(self) -> PerLayerTranscoders:
    """Check that the arrays fit together; return self (TranscoderError otherwise)."""
    if jnp.ndim(self.W_enc) != 3:
      raise TranscoderError(f"transcoders: W_enc has shape {jnp.shape(self.W_enc)}, expected "
                            "[n_layers, d_model, d_transcoder]")
    L, d, F = self.W_enc.shape
    check_shapes("transcoders", vars(self), {
        "b_enc": (L, F), "W_dec": (L, F, d), "b_dec": (L, d), "threshold": (L, F),
        "W_skip": (L, d, d)})
    return self

  def decode(self, f: Array, x: Array | None = None) -> Array:
    """Each layer's output. f: Float[Array, "L ... F"]; x: the inputs (needed with W_skip).

    Returns Float[Array, "L ... d_model"].
    """
    if self.W_skip is not None and x is None:
      raise TranscoderError("transcoders with a skip connection need the inputs x to decode")
    flat = f.astype(self.dtype).reshape(f.shape[0], -1, f.shape[-1])
    out = jnp.einsum("lnf,lfd->lnd", flat, self.W_dec) + self.b_dec[:, None, :]
    out = out.reshape(f.shape[:-1] + (self.d_model,))
    return out if self.W_skip is None else out + self.skip(x)

  def reconstruct(self, x: Array) -> Array:
    """decode(encode(x), x): each layer's replacement output, Float[Array, "L ... d_model"]."""
    return self.decode(self.encode(x), x)
