"""Interventions: pytrees of arrays that map a site's activation `x` to a new one.

Each intervention is a `flax.struct.dataclass` with a `__call__(x) -> x'`. Pass them to the forward as
`interventions={"blocks.0.hook_resid_pre": Patch(value), ...}`. Their array fields are ordinary
traced arguments, so `jax.jit`, `jax.grad` and `jax.vmap` apply to them directly.

Selection (`Where`): every intervention applies only where its selection holds: a subset of positions,
of heads (for per-head sites such as `attn.hook_z`, `[batch, pos, head, ...]`) and of examples in the
batch. Unselected entries keep their value.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
IndexLike = Union[None, int, Sequence[int], np.ndarray, Array]


class InterventionError(ValueError):
  """An intervention that does not fit the site it is applied to."""


def _as_mask(index: IndexLike, size: int, what: str) -> Optional[np.ndarray]:
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
  def of(positions: IndexLike = None, heads: IndexLike = None, batch: IndexLike = None) -> "Where":
    t = lambda v: None if v is None else tuple(np.atleast_1d(np.asarray(v)).tolist())
    return Where(t(positions), t(heads), t(batch))

  def mask(self, x: Array) -> Optional[Array]:
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
      sel = _as_mask(idx, x.shape[axis], what)
      s = list(shape)
      s[axis] = x.shape[axis]
      m = m & sel.reshape(s)
    return jnp.asarray(m)

  def apply(self, x: Array, new: Array) -> Array:
    new = jnp.broadcast_to(new, x.shape).astype(x.dtype)
    m = self.mask(x)
    return new if m is None else jnp.where(m, new, x)


ALL = Where()


def _check_broadcast(value: Array, x: Array, name: str) -> None:
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
    _check_broadcast(self.value, x, "Patch")
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
    _check_broadcast(self.mean, x, "MeanAblate")
    return self.where.apply(x, self.mean)


@flax.struct.dataclass
class Add:
  """Additive intervention, e.g. a steering vector: x + scale * vector."""

  vector: Array
  scale: Array = 1.0
  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    _check_broadcast(self.vector, x, "Add")
    return self.where.apply(x, x + self.scale * self.vector)


# ---------------------------------------------------------------------------------------------------
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
      raise InterventionError(f"WhereEach needs an activation [batch, pos, ...]; got shape {x.shape}")
    pos = jnp.asarray(self.positions)
    if not jnp.issubdtype(pos.dtype, jnp.integer):
      raise InterventionError(f"WhereEach positions must be integers, got {pos.dtype}")
    if pos.ndim == 1:
      pos = pos[:, None]
    if pos.ndim != 2 or pos.shape[0] not in (1, x.shape[0]):
      raise InterventionError(f"WhereEach positions of shape {tuple(self.positions.shape)} do not match "
                              f"batch size {x.shape[0]}; expected [batch] or [batch, n]")
    P = x.shape[1]
    pos = jnp.where(pos < 0, pos + P, pos)
    m = (jnp.arange(P)[None, :, None] == pos[:, None, :]).any(-1)  # [batch, pos]
    m = m.reshape(m.shape + (1,) * (x.ndim - 2))
    if self.heads is not None:
      if x.ndim < 3:
        raise InterventionError(f"head selection needs an activation with axis 2; got shape {x.shape}")
      h = _as_mask(self.heads, x.shape[2], "head")
      m = m & jnp.asarray(h).reshape((1, 1, x.shape[2]) + (1,) * (x.ndim - 3))
    return m

  def apply(self, x: Array, new: Array) -> Array:
    new = jnp.broadcast_to(new, x.shape).astype(x.dtype)
    return jnp.where(self.mask(x), new, x)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _source(source: Optional[Array], x: Array, name: str) -> Array:
  """The source activation broadcast to the site's shape, with a clear error if absent or mismatched."""
  if source is None:
    raise InterventionError(
        f"{name} is an interchange intervention and needs a source activation: run the model on the "
        f"source input with collect=(site,) and pass it as `source=` (or use with_sources)")
  _check_broadcast(source, x, name)
  return jnp.broadcast_to(jnp.asarray(source), x.shape).astype(jnp.result_type(x.dtype, jnp.float32))


def _dims_index(dims: tuple, size: int, name: str) -> np.ndarray:
  idx = np.atleast_1d(np.asarray(dims))
  if idx.size == 0:
    raise InterventionError(f"{name}: empty dims selection")
  if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
    raise InterventionError(f"{name}: dims must be integer indices, got {idx.dtype}")
  if idx.min() < -size or idx.max() >= size:
    raise InterventionError(f"{name}: dims {idx.tolist()} out of range for a last axis of size {size}")
  return idx


def _check_last(arr: Array, shape: tuple, x: Array, name: str, what: str) -> None:
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
  raise InterventionError(f"unknown orthogonal parametrisation {method!r}; use 'none', 'cayley' or 'qr'")


# ---------------------------------------------------------------------------------------------------
# Basis interventions


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
    src = _source(self.source, x, "Interchange")
    if self.dims is None:
      return self.where.apply(x, src)
    idx = _dims_index(self.dims, x.shape[-1], "Interchange")
    return self.where.apply(x, jnp.asarray(x, src.dtype).at[..., idx].set(src[..., idx]))


@flax.struct.dataclass
class Subtract:
  """Subtractive intervention: x - scale * vector (e.g. remove a direction's mean contribution)."""

  vector: Array
  scale: Array = 1.0
  where: Where = ALL

  def __call__(self, x: Array) -> Array:
    _check_broadcast(self.vector, x, "Subtract")
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
      idx = _dims_index(self.dims, x.shape[-1], "GaussianNoise")
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
    for axis, idx, what in ((0, w.batch, "batch"), (1, w.positions, "position"), (2, w.heads, "head")):
      if idx is not None:
        m = _as_mask(idx, x.shape[axis], what)
        x = jnp.take(x, np.nonzero(m)[0], axis=axis)
    return x


@flax.struct.dataclass
class SigmoidMask:
  """Soft interchange over dims or neurons: (1 - s) * x + s * source with s = sigmoid(mask / T).

  Trainable: `mask` (Float[Array, "d"]); `temperature` is a traced scalar (anneal it during training).
  """

  mask: Array
  source: Array = None
  temperature: Array = 0.01
  where: Where = ALL

  trainable = ("mask",)

  def __call__(self, x: Array) -> Array:
    _check_last(self.mask, (x.shape[-1],), x, "SigmoidMask", "mask")
    src = _source(self.source, x, "SigmoidMask")
    s = jax.nn.sigmoid(self.mask / self.temperature)
    return self.where.apply(x, (1.0 - s) * x + s * src)


# ---------------------------------------------------------------------------------------------------
# Distributed (rotated-space) interventions: DAS


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
    _check_last(self.rotation, (d, d), x, "RotatedSpace", "rotation")
    if not 0 <= self.k <= d:
      raise InterventionError(f"RotatedSpace: k={self.k} outside [0, {d}]")
    src = _source(self.source, x, "RotatedSpace")
    R = self.matrix()
    rb, rs = x.astype(R.dtype) @ R, src @ R
    if self.subspace is not None:
      idx = _dims_index(self.subspace, d, "RotatedSpace subspace")
      return self.where.apply(x, rb.at[..., idx].set(rs[..., idx]) @ R.T)
    rot = jnp.concatenate([rs[..., :self.k], rb[..., self.k:]], -1)
    return self.where.apply(x, rot @ R.T)


def sigmoid_boundary(population: Array, lo: Array, hi: Array, temperature: Array) -> Array:
  """sigmoid((i - lo) / T) * sigmoid((hi - i) / T): a soft indicator of lo < i < hi."""
  return jax.nn.sigmoid((population - lo) / temperature) * jax.nn.sigmoid((hi - population) / temperature)


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
    _check_last(self.rotation, (d, d), x, "BoundlessRotatedSpace", "rotation")
    if jnp.size(self.boundary) != 1:
      raise InterventionError(f"BoundlessRotatedSpace: boundary must be a scalar, got shape "
                              f"{jnp.shape(self.boundary)}")
    src = _source(self.source, x, "BoundlessRotatedSpace")
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
    _check_last(self.rotation, (d, d), x, "SigmoidMaskRotatedSpace", "rotation")
    _check_last(self.mask, (d,), x, "SigmoidMaskRotatedSpace", "mask")
    src = _source(self.source, x, "SigmoidMaskRotatedSpace")
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
      raise InterventionError(f"LowRankRotatedSpace: basis has shape {jnp.shape(self.basis)}, expected "
                              f"({d}, k) with k <= {d} for a site of shape {x.shape}")
    if self.param == "cayley":
      raise InterventionError("LowRankRotatedSpace: the Cayley map needs a square matrix; use 'qr'")
    src = _source(self.source, x, "LowRankRotatedSpace")
    B = self.matrix()
    if self.subspace is not None:
      B = B[:, _dims_index(self.subspace, B.shape[1], "LowRankRotatedSpace subspace")]
    xf = x.astype(B.dtype)
    return self.where.apply(x, xf + ((src - xf) @ B) @ B.T)


# ---------------------------------------------------------------------------------------------------
# Autoencoders and SAEs


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
  def jumprelu(W_enc, b_enc, W_dec, b_dec, threshold, **kw) -> "Autoencoder":
    """A JumpReLU SAE (Gemma Scope convention: no decoder-bias centring)."""
    return Autoencoder(W_enc, b_enc, W_dec, b_dec, threshold=threshold, activation="jumprelu",
                       center=False, **kw)

  def _check(self, x: Array) -> int:
    d = x.shape[-1]
    if jnp.ndim(self.W_enc) != 2 or jnp.shape(self.W_enc)[0] != d:
      raise InterventionError(f"Autoencoder: W_enc has shape {jnp.shape(self.W_enc)}, expected ({d}, n) "
                              f"for a site of shape {x.shape}")
    n = jnp.shape(self.W_enc)[1]
    for arr, shape, what in ((self.b_enc, (n,), "b_enc"), (self.W_dec, (n, d), "W_dec"),
                             (self.b_dec, (d,), "b_dec")):
      _check_last(arr, shape, x, "Autoencoder", what)
    if self.activation not in ("relu", "jumprelu"):
      raise InterventionError(f"Autoencoder: unknown activation {self.activation!r}; use 'relu' or "
                              f"'jumprelu'")
    if self.activation == "jumprelu":
      if self.threshold is None:
        raise InterventionError("Autoencoder: a JumpReLU SAE needs `threshold`")
      _check_last(self.threshold, (n,), x, "Autoencoder", "threshold")
    for arr, what in ((self.latent_scale, "latent_scale"), (self.latent_add, "latent_add")):
      if arr is not None:
        try:
          jnp.broadcast_shapes(jnp.shape(arr), (n,))
        except ValueError:
          raise InterventionError(f"Autoencoder: {what} of shape {jnp.shape(arr)} does not broadcast "
                                  f"to the {n} latents") from None
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
      fs = self.encode(_source(self.source, x, "Autoencoder"))
      if self.latents is None:
        g = fs
      else:
        idx = _dims_index(self.latents, n, "Autoencoder latents")
        g = g.at[..., idx].set(fs[..., idx])
    elif self.latents is not None and self.latent_scale is None and self.latent_add is None:
      raise InterventionError("Autoencoder: `latents` given without a source, latent_scale or latent_add")
    if self.latent_scale is not None:
      g = g * self.latent_scale
    if self.latent_add is not None:
      g = g + self.latent_add
    out = self.decode(g)
    if self.keep_error:
      out = out + (x.astype(jnp.float32) - self.decode(f))
    return self.where.apply(x, out)


@flax.struct.dataclass
class Chain:
  """Several interventions at one site, applied left to right."""

  items: tuple

  def __call__(self, x: Array) -> Array:
    for it in self.items:
      x = it(x).astype(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------------
# Running with interventions: sources, collection, multi-source


INTERVENTION_TYPES = {c.__name__: c for c in (
    Patch, Zero, MeanAblate, Add, Subtract, Interchange, GaussianNoise, Collect, SigmoidMask,
    RotatedSpace, BoundlessRotatedSpace, SigmoidMaskRotatedSpace, LowRankRotatedSpace, Autoencoder,
    Chain)}


def _check_callable(site: str, iv) -> None:
  if not callable(iv):
    raise InterventionError(f"the intervention at {site!r} is a {type(iv).__name__}, not a callable "
                            f"x -> x' (see jaxinterp.interventions)")


def collect_sources(cfg, params, sources, sites, *, attention_mask=None) -> dict[str, Array]:
  """Run the model on source inputs and return each site's activation (for interchange).

  Args:
    cfg, params: the model (`models.forward` arguments).
    sources: Int[Array, "batch pos"] used for every site, or {site: tokens} for multi-source
      interchange (a different source input per site; identical arrays are run once).
    sites: the site names to collect.
    attention_mask: Bool[Array, "batch pos"] for the sources (or a {site: mask} dict).

  Returns:
    {site: activation} with each site's own source activation.
  """
  from jaxinterp.models import forward
  sites = list(sites)
  if not isinstance(sources, dict):
    sources = {s: sources for s in sites}
  missing = [s for s in sites if s not in sources]
  if missing:
    raise InterventionError(f"no source input given for site(s) {missing}")
  masks = attention_mask if isinstance(attention_mask, dict) else {s: attention_mask for s in sites}
  groups: list[tuple] = []  # (tokens, mask, [sites])
  for s in sites:
    for g in groups:
      if g[0] is sources[s] and g[1] is masks.get(s):
        g[2].append(s)
        break
    else:
      groups.append((sources[s], masks.get(s), [s]))
  out = {}
  for toks, mask, names in groups:
    _, cache = forward(cfg, params, toks, attention_mask=mask, collect=tuple(names))
    out.update(cache)
  return out


def _waits(iv) -> bool:
  """An interchange intervention without its source activation yet."""
  return hasattr(iv, "source") and iv.source is None and not isinstance(iv, Autoencoder)


def with_sources(interventions: dict, sources: dict) -> dict:
  """Fill the `source` field of each interchange intervention from {site: source activation}."""
  out = {}
  for site, iv in interventions.items():
    if site in sources and isinstance(iv, Chain):  # every item still without a source
      iv = Chain(tuple(it.replace(source=sources[site]) if _waits(it) else it for it in iv.items))
    elif site in sources:
      if not hasattr(iv, "source"):
        raise InterventionError(f"{type(iv).__name__} at {site!r} takes no source activation")
      iv = iv.replace(source=sources[site])
    out[site] = iv
  return out


def run(cfg, params, tokens, interventions: dict, *, sources=None, source_mask=None, collect=(),
        **kw):
  """Forward with interventions at several sites in one call.

  Interchange interventions whose `source` is None get it from `sources` (tokens for all sites, or
  {site: tokens} for multi-source), collected first with the frozen model. `Collect` entries are
  not applied; their selected values are returned.

  Returns:
    (logits Float[Array, "batch pos vocab"], {site: collected values}).
  """
  from jaxinterp.models import forward
  for site, iv in interventions.items():
    _check_callable(site, iv)
  collects = {s: iv for s, iv in interventions.items() if isinstance(iv, Collect)}
  active = {s: iv for s, iv in interventions.items() if not isinstance(iv, Collect)}
  need = [s for s, iv in active.items()
          if any(_waits(it) for it in (iv.items if isinstance(iv, Chain) else (iv,)))]
  if need:
    if sources is None:
      raise InterventionError(f"interchange intervention(s) at {need} have no source activation; pass "
                              f"`sources=` (tokens, or {{site: tokens}})")
    active = with_sources(active, collect_sources(cfg, params, sources, need,
                                                  attention_mask=source_mask))
  names = tuple(set(collect) | set(collects))
  logits, cache = forward(cfg, params, tokens, interventions=active, collect=names, **kw) if names \
      else (forward(cfg, params, tokens, interventions=active, **kw), {})
  cache = dict(cache)
  for s, c in collects.items():
    cache[s] = c.select(cache[s])
  return logits, cache
