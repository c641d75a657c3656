"""Basis-aligned interventions: interchange, subtraction, noise, collection and learned sigmoid
masks over a site's dimensions."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.interventions.basic import (
  ALL,
  Array,
  Where,
  as_mask,
  check_broadcast,
  check_last,
  dims_index,
  source_or_self,
)


@flax.struct.dataclass
class Interchange:
  """Interchange with a source run's activation: the whole vector, or only the given dims.

  `source` is the same site's activation on the source input (shape broadcastable to the site's,
  e.g. `cache[site]` from `forward(..., collect=(site,))`, or `src[:, [p]]` to take one position).
  With `dims`, only those indices of the last axis (a neuron or coordinate subspace) are swapped.
  """

  source: Array = None
  dims: tuple = flax.struct.field(pytree_node=False, default=None)
  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    src = source_or_self(self.source, x, "Interchange")
    if self.dims is None:
      return self.where.apply(x, src)
    idx = dims_index(self.dims, x.shape[-1], "Interchange")
    return self.where.apply(x, jnp.asarray(x, src.dtype).at[..., idx].set(src[..., idx]))


@flax.struct.dataclass
class Subtract:
  """Subtractive intervention: x - scale * vector (e.g. remove a direction's mean contribution)."""

  vector: Array
  scale: Array = 1.0
  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    check_broadcast(self.vector, x, "Subtract")
    return self.where.apply(x, x - self.scale * self.vector)


@flax.struct.dataclass
class GaussianNoise:
  """Add Gaussian noise `scale * N(0, 1)` drawn from an explicit PRNG key (same key, same noise).

  With `dims`, noise is added only to those indices of the last axis.
  """

  key: Array
  scale: Array = 1.0
  dims: tuple = flax.struct.field(pytree_node=False, default=None)
  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    noise = jax.random.normal(self.key, x.shape, jnp.float32) * self.scale
    if self.dims is not None:
      idx = dims_index(self.dims, x.shape[-1], "GaussianNoise")
      keep = np.zeros(x.shape[-1], bool)
      keep[idx] = True
      noise = jnp.where(jnp.asarray(keep), noise, 0.0)
    return self.where.apply(x, x + noise)


@flax.struct.dataclass
class Collect:
  """Marks a site to collect (identity on the activation); `run` returns the selected values."""

  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    return x

  def select(self, x: Array) -> Array:
    """The selected entries: x indexed by the static batch, positions and heads."""
    w = self.where
    if not isinstance(w, Where):
      return jnp.where(w.mask(x), x, 0)
    for axis, idx, what in ((0, w.batch, "batch"), (1, w.positions, "position"),
                            (2, w.heads, "head")):
      if idx is not None:
        m = as_mask(idx, x.shape[axis], what)
        x = jnp.take(x, np.nonzero(m)[0], axis=axis)
    return x


@flax.struct.dataclass
class SigmoidMask:
  """Soft interchange over dims or neurons: (1 - s) * x + s * source with s = sigmoid(mask / T).

  Trainable: `mask` (Float[Array, "d"]); `temperature` is a traced scalar (anneal it during
  training).
  """

  mask: Array
  source: Array = None
  temperature: Array = 0.01
  where: Where = ALL

  trainable = ("mask",)

  def __call__(self, x: Array) -> Array:
    check_last(self.mask, (x.shape[-1],), x, "SigmoidMask", "mask")
    src = source_or_self(self.source, x, "SigmoidMask")
    s = jax.nn.sigmoid(self.mask / self.temperature)
    return self.where.apply(x, (1.0 - s) * x + s * src)
