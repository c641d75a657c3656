"""Distributed (rotated-space) interventions: DAS and its boundless, sigmoid-mask and low-rank
variants (Geiger et al. 2024; pyvene's `RotatedSpaceIntervention` family)."""

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
  orthogonalize,
  source_or_self,
)


@flax.struct.dataclass
class RotatedSpace:
  """DAS: rotate with an orthogonal R, interchange the first k rotated coordinates, rotate back.

  out = concat((source R)[..., :k], (x R)[..., k:]) R^T. With `param="cayley"` or `"qr"` the field
  `rotation` is an unconstrained parameter mapped to R by `orthogonalize` (for training); with
  `param="none"` it is R itself.

  Attributes:
    rotation: Float[Array, "d d"].
    k: number of interchanged rotated coordinates (static), 0 <= k <= d.
    subspace: the rotated coordinates interchanged instead of the first k (static indices; pyvene's
      `subspaces`): e.g. one variable in coordinates 0..7 and another in 8..15 of one rotation.
  """

  rotation: Array
  k: int = flax.struct.field(pytree_node=False, default=1)
  source: Array = None
  param: str = flax.struct.field(pytree_node=False, default="none")
  where: Where = ALL
  subspace: tuple = flax.struct.field(pytree_node=False, default=None)

  trainable = ("rotation",)

  def matrix(self) -> Array:
    """The orthogonal R: Float[Array, "d d"]."""
    return orthogonalize(self.rotation, self.param)

  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    check_last(self.rotation, (d, d), x, "RotatedSpace", "rotation")
    if not 0 <= self.k <= d:
      raise InterventionError(f"RotatedSpace: k={self.k} outside [0, {d}]")
    src = source_or_self(self.source, x, "RotatedSpace")
    R = self.matrix()
    rb, rs = x.astype(R.dtype) @ R, src @ R
    if self.subspace is not None:
      idx = dims_index(self.subspace, d, "RotatedSpace subspace")
      return self.where.apply(x, rb.at[..., idx].set(rs[..., idx]) @ R.T)
    rot = jnp.concatenate([rs[..., :self.k], rb[..., self.k:]], -1)
    return self.where.apply(x, rot @ R.T)


def sigmoid_boundary(population: Array, lo: Array, hi: Array, temperature: Array) -> Array:
  """sigmoid((i - lo) / T) * sigmoid((hi - i) / T): a soft indicator of lo < i < hi."""
  return (jax.nn.sigmoid((population - lo) / temperature)
          * jax.nn.sigmoid((hi - population) / temperature))


@flax.struct.dataclass
class BoundlessRotatedSpace:
  """Boundless DAS: a soft mask over rotated coordinates with a learnable boundary.

  mask_i = sigmoid(i / T) * sigmoid((clip(boundary, 1e-3, 1) * d - i) / T) for i = 0..d-1;
  out = ((1 - mask) * (x R) + mask * (source R)) R^T (pyvene's BoundlessRotatedSpaceIntervention).

  Attributes:
    rotation: Float[Array, "d d"] (raw parameter unless param="none").
    boundary: Float[Array, ""]: fraction of the d rotated coordinates interchanged.
    temperature: Float[Array, ""]: anneal from large (soft) to small (hard).
  """

  rotation: Array
  boundary: Array = 0.5
  temperature: Array = 50.0
  source: Array = None
  param: str = flax.struct.field(pytree_node=False, default="none")
  where: Where = ALL

  trainable = ("rotation", "boundary")

  def matrix(self) -> Array:
    return orthogonalize(self.rotation, self.param)

  def boundary_mask(self, d: int) -> Array:
    """The soft mask over rotated coordinates: Float[Array, "d"]."""
    b = jnp.clip(jnp.reshape(jnp.asarray(self.boundary, jnp.float32), ()), 1e-3, 1.0)
    return sigmoid_boundary(jnp.arange(d, dtype=jnp.float32), 0.0, b * d, self.temperature)

  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    check_last(self.rotation, (d, d), x, "BoundlessRotatedSpace", "rotation")
    if jnp.size(self.boundary) != 1:
      raise InterventionError(f"BoundlessRotatedSpace: boundary must be a scalar, got shape "
                              f"{jnp.shape(self.boundary)}")
    src = source_or_self(self.source, x, "BoundlessRotatedSpace")
    R = self.matrix()
    m = self.boundary_mask(d)
    rb, rs = x.astype(R.dtype) @ R, src @ R
    return self.where.apply(x, ((1.0 - m) * rb + m * rs) @ R.T)


@flax.struct.dataclass
class SigmoidMaskRotatedSpace:
  """A per-coordinate sigmoid mask in a learned rotated space (pyvene's SigmoidMaskRotatedSpace)."""

  rotation: Array
  mask: Array
  temperature: Array = 50.0
  source: Array = None
  param: str = flax.struct.field(pytree_node=False, default="none")
  where: Where = ALL

  trainable = ("rotation", "mask")

  def matrix(self) -> Array:
    return orthogonalize(self.rotation, self.param)

  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    check_last(self.rotation, (d, d), x, "SigmoidMaskRotatedSpace", "rotation")
    check_last(self.mask, (d,), x, "SigmoidMaskRotatedSpace", "mask")
    src = source_or_self(self.source, x, "SigmoidMaskRotatedSpace")
    R = self.matrix()
    m = jax.nn.sigmoid(self.mask / self.temperature)
    rb, rs = x.astype(R.dtype) @ R, src @ R
    return self.where.apply(x, ((1.0 - m) * rb + m * rs) @ R.T)


@flax.struct.dataclass
class LowRankRotatedSpace:
  """Interchange within the span of an orthonormal d x k basis B: x + ((source - x) B) B^T.

  With `param="qr"` the field `basis` is an unconstrained d x k parameter mapped to orthonormal
  columns by QR; with `param="none"` it must already be orthonormal.

  Attributes:
    basis: Float[Array, "d k"].
    subspace: the basis columns used (static indices; None = all k), e.g. one variable per group of
      columns of one shared basis.
  """

  basis: Array
  source: Array = None
  param: str = flax.struct.field(pytree_node=False, default="none")
  where: Where = ALL
  subspace: tuple = flax.struct.field(pytree_node=False, default=None)

  trainable = ("basis",)

  def matrix(self) -> Array:
    """The orthonormal basis: Float[Array, "d k"]."""
    return orthogonalize(self.basis, self.param)

  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    if jnp.ndim(self.basis) != 2 or jnp.shape(self.basis)[0] != d or jnp.shape(self.basis)[1] > d:
      raise InterventionError(f"LowRankRotatedSpace: basis has shape {jnp.shape(self.basis)}, "
                              f"expected ({d}, k) with k <= {d} for a site of shape {x.shape}")
    if self.param == "cayley":
      raise InterventionError("LowRankRotatedSpace: the Cayley map needs a square matrix; use 'qr'")
    src = source_or_self(self.source, x, "LowRankRotatedSpace")
    B = self.matrix()
    if self.subspace is not None:
      B = B[:, dims_index(self.subspace, B.shape[1], "LowRankRotatedSpace subspace")]
    xf = x.astype(B.dtype)
    return self.where.apply(x, xf + ((src - xf) @ B) @ B.T)
