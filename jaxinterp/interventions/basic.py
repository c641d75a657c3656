"""Selection (`Where`, `WhereEach`), the simple interventions (`Patch`, `Zero`, `MeanAblate`, `Add`)
and the helpers every intervention module shares.

Selection (`Where`): every intervention applies only where its selection holds: a subset of
positions, of heads (for per-head sites such as `attn.hook_z`, `[batch, pos, head, ...]`) and of
examples in the batch. Unselected entries keep their value.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
IndexLike = None | int | Sequence[int] | np.ndarray | Array


class InterventionError(ValueError):
  """An intervention that does not fit the site it is applied to."""


def as_mask(index: IndexLike, size: int, what: str) -> np.ndarray | None:
  if index is None:
    return None
  idx = np.atleast_1d(np.asarray(index))
  if idx.dtype == bool:
    if idx.shape != (size,):
      raise InterventionError(f"{what} mask has shape {idx.shape}, expected ({size},)")
    return idx
  if not np.issubdtype(idx.dtype, np.integer):
    raise InterventionError(f"{what} indices must be integers, got {idx.dtype}")
  if idx.size and (idx.min() < -size or idx.max() >= size):
    raise InterventionError(f"{what} index out of range for size {size}: {idx.tolist()}")
  m = np.zeros(size, bool)
  m[idx] = True
  return m


@flax.struct.dataclass
class Where:
  """Which entries of a site an intervention touches (static: Python ints, not traced).

  Attributes:
    positions: token positions (axis 1 of `[batch, pos, ...]`); None = all.
    heads: heads (axis 2 of per-head sites `[batch, pos, head, ...]`); None = all.
    batch: examples (axis 0); None = all.
  """

  positions: tuple = flax.struct.field(pytree_node=False, default=None)
  heads: tuple = flax.struct.field(pytree_node=False, default=None)
  batch: tuple = flax.struct.field(pytree_node=False, default=None)

  @staticmethod
  def of(positions: IndexLike = None, heads: IndexLike = None, batch: IndexLike = None) -> Where:
    def t(v):
      return None if v is None else tuple(np.atleast_1d(np.asarray(v)).tolist())

    return Where(t(positions), t(heads), t(batch))

  def mask(self, x: Array) -> Array | None:
    """A boolean mask broadcastable to `x`, or None if everything is selected."""
    if self.positions is None and self.heads is None and self.batch is None:
      return None
    shape = [1] * x.ndim
    m = np.ones([1] * x.ndim, bool)
    for axis, idx, what in ((0, self.batch, "batch"), (1, self.positions, "position"),
                            (2, self.heads, "head")):
      if idx is None:
        continue
      if axis >= x.ndim:
        raise InterventionError(f"{what} selection needs an activation with axis {axis}; got shape "
                                f"{x.shape}")
      sel = as_mask(idx, x.shape[axis], what)
      s = list(shape)
      s[axis] = x.shape[axis]
      m = m & sel.reshape(s)
    return jnp.asarray(m)

  def apply(self, x: Array, new: Array) -> Array:
    new = jnp.broadcast_to(new, x.shape).astype(x.dtype)
    m = self.mask(x)
    return new if m is None else jnp.where(m, new, x)


ALL = Where()


def check_broadcast(value: Array, x: Array, name: str) -> None:
  try:
    jnp.broadcast_shapes(jnp.shape(value), x.shape)
  except ValueError:
    raise InterventionError(f"{name} value of shape {jnp.shape(value)} does not broadcast to the "
                            f"site's shape {x.shape}") from None


@flax.struct.dataclass
class Patch:
  """Replace the activation with given values (e.g. from a source run): interchange."""

  value: Array
  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    check_broadcast(self.value, x, "Patch")
    return self.where.apply(x, self.value)


@flax.struct.dataclass
class Zero:
  """Zero ablation."""

  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    return self.where.apply(x, jnp.zeros((), x.dtype))


@flax.struct.dataclass
class MeanAblate:
  """Mean ablation from given means (broadcast over batch and, if given without it, positions)."""

  mean: Array
  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    check_broadcast(self.mean, x, "MeanAblate")
    return self.where.apply(x, self.mean)


@flax.struct.dataclass
class Add:
  """Additive intervention, e.g. a steering vector: x + scale * vector."""

  vector: Array
  scale: Array = 1.0
  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    check_broadcast(self.vector, x, "Add")
    return self.where.apply(x, x + self.scale * self.vector)


# --------------------------------------------------------------------------------------------------
# Per-example selection


@flax.struct.dataclass
class WhereEach:
  """Per-example positions (traced), e.g. each example's last real token under right padding.

  Attributes:
    positions: Int[Array, "batch"] or Int[Array, "batch n"]: the positions selected in each example
      (negative values count from the end).
    heads: static heads selection (axis 2 of per-head sites); None = all.
  """

  positions: Array
  heads: tuple = flax.struct.field(pytree_node=False, default=None)

  def mask(self, x: Array) -> Array:
    """A boolean mask broadcastable to `x` (`[batch, pos, 1 or head, 1, ...]`)."""
    if x.ndim < 2:
      raise InterventionError("WhereEach needs an activation [batch, pos, ...]; got shape "
                              f"{x.shape}")
    pos = jnp.asarray(self.positions)
    if not jnp.issubdtype(pos.dtype, jnp.integer):
      raise InterventionError(f"WhereEach positions must be integers, got {pos.dtype}")
    if pos.ndim == 1:
      pos = pos[:, None]
    if pos.ndim != 2 or pos.shape[0] not in (1, x.shape[0]):
      raise InterventionError(f"WhereEach positions of shape {tuple(self.positions.shape)} do not "
                              f"match batch size {x.shape[0]}; expected [batch] or [batch, n]")
    P = x.shape[1]
    pos = jnp.where(pos < 0, pos + P, pos)
    m = (jnp.arange(P)[None, :, None] == pos[:, None, :]).any(-1)  # [batch, pos]
    m = m.reshape(m.shape + (1,) * (x.ndim - 2))
    if self.heads is not None:
      if x.ndim < 3:
        raise InterventionError("head selection needs an activation with axis 2; got shape "
                                f"{x.shape}")
      h = as_mask(self.heads, x.shape[2], "head")
      m = m & jnp.asarray(h).reshape((1, 1, x.shape[2]) + (1,) * (x.ndim - 3))
    return m

  def apply(self, x: Array, new: Array) -> Array:
    new = jnp.broadcast_to(new, x.shape).astype(x.dtype)
    return jnp.where(self.mask(x), new, x)


# --------------------------------------------------------------------------------------------------
# Helpers


def source_or_self(source: Array | None, x: Array, name: str) -> Array:
  """The source activation broadcast to the site's shape, with a clear error if absent or
  mismatched."""
  if source is None:
    raise InterventionError(
        f"{name} is an interchange intervention and needs a source activation: run the model on "
        "the source input with collect=(site,) and pass it as `source=` (or use with_sources)")
  check_broadcast(source, x, name)
  return jnp.broadcast_to(jnp.asarray(source), x.shape).astype(
      jnp.result_type(x.dtype, jnp.float32))


def dims_index(dims: tuple, size: int, name: str) -> np.ndarray:
  idx = np.atleast_1d(np.asarray(dims))
  if idx.size == 0:
    raise InterventionError(f"{name}: empty dims selection")
  if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
    raise InterventionError(f"{name}: dims must be integer indices, got {idx.dtype}")
  if idx.min() < -size or idx.max() >= size:
    raise InterventionError(f"{name}: dims {idx.tolist()} out of range for a last axis of size "
                            f"{size}")
  return idx


def check_last(arr: Array, shape: tuple, x: Array, name: str, what: str) -> None:
  got = tuple(jnp.shape(arr))
  if got != shape:
    raise InterventionError(f"{name}: {what} has shape {got}, expected {shape} for a site of shape "
                            f"{x.shape} (last axis {x.shape[-1]})")


def orthogonalize(raw: Array, method: str) -> Array:
  """Map an unconstrained parameter to an orthogonal matrix (or orthonormal columns).

  Args:
    raw: Float[Array, "d k"] (k <= d; square for "cayley").
    method: "none" (use `raw` as is), "cayley" (R = (I + A)^-1 (I - A) with A = raw - raw^T skew;
      square only; raw = 0 gives the identity) or "qr" (the Q factor of raw with a sign convention
      that makes the map continuous; any k <= d).

  Returns:
    Float[Array, "d k"] with orthonormal columns (exactly `raw` for "none").
  """
  if method == "none":
    return raw
  if raw.ndim != 2:
    raise InterventionError(f"orthogonal parametrisation needs a 2-d matrix, got shape {raw.shape}")
  d, k = raw.shape
  if method == "cayley":
    if d != k:
      raise InterventionError(f"the Cayley map needs a square matrix, got {raw.shape}; use 'qr'")
    a = (raw - raw.T).astype(jnp.float32)
    eye = jnp.eye(d, dtype=jnp.float32)
    return jnp.linalg.solve(eye + a, eye - a)
  if method == "qr":
    if k > d:
      raise InterventionError(f"QR parametrisation needs k <= d, got shape {raw.shape}")
    q, r = jnp.linalg.qr(raw.astype(jnp.float32))
    s = jnp.sign(jnp.diagonal(r))
    return q * jnp.where(s == 0, 1.0, s)[None, :]
  raise InterventionError(f"unknown orthogonal parametrisation {method!r}; use 'none', 'cayley' or "
                          "'qr'")
