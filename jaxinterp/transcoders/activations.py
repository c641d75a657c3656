"""The feature activation functions and the encoder they finish: ReLU and JumpReLU.

JumpReLU is `z * (z > theta)` (Rajamanoharan et al. 2024, "Jumping Ahead", as Gemma Scope and
circuit-tracer use it). Its gradient with respect to the threshold is zero almost everywhere, so
training uses the straight-through estimator of the paper with a rectangle kernel of width
`bandwidth`:

  d/dtheta JumpReLU(z) := -(theta / bandwidth) * rect((z - theta) / bandwidth)
  d/dtheta H(z - theta) := -(1 / bandwidth) * rect((z - theta) / bandwidth)

(the second is the L0 penalty's step function). The gradient with respect to `z` is the exact one,
`z > theta` for JumpReLU and 0 for the step, as in the paper and in circuit-tracer's `jumprelu`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _rect(x: Array) -> Array:
  return ((x > -0.5) & (x < 0.5)).astype(x.dtype)


def _sum_to(g: Array, shape: tuple[int, ...]) -> Array:
  """Sum a broadcast gradient back to `shape` (leading axes and axes of size one)."""
  lead = g.ndim - len(shape)
  g = g.sum(axis=tuple(range(lead))) if lead else g
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
  return g.sum(axis=axes, keepdims=True) if axes else g


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: Array, threshold: Array, bandwidth: float) -> Array:
  """`z * (z > threshold)`; the threshold's gradient is the rectangle-kernel STE (module doc)."""
  return z * (z > threshold).astype(z.dtype)


def _jumprelu_fwd(z, threshold, bandwidth):
  return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, res, g):
  z, threshold = res
  dz = (z > threshold).astype(g.dtype) * g
  dt = -(threshold / bandwidth) * _rect((z - threshold) / bandwidth) * g
  return dz, _sum_to(dt, jnp.shape(threshold))


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z: Array, threshold: Array, bandwidth: float) -> Array:
  """Heaviside `z > threshold` as a float (the L0 count), with the STE of the module doc."""
  return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
  return step(z, threshold, bandwidth), (z, threshold)


def _step_bwd(bandwidth, res, g):
  z, threshold = res
  dt = -(1.0 / bandwidth) * _rect((z - threshold) / bandwidth) * g
  return jnp.zeros_like(z), _sum_to(dt, jnp.shape(threshold))


step.defvjp(_step_fwd, _step_bwd)


def _per_layer(a: Array, ndim: int) -> Array:
  """[L, n] -> [L, 1, ..., 1, n] so that it broadcasts over an input of rank `ndim`."""
  return a.reshape(a.shape[:1] + (1,) * (ndim - 2) + a.shape[1:])


def encode(W_enc: Array, b_enc: Array, threshold: Array | None, x: Array,
           bandwidth: float = 1e-3) -> Array:
  """Feature activations of stacked per-layer encoders.

  Args:
    W_enc: Float[Array, "L d_model F"]; b_enc: Float[Array, "L F"];
    threshold: Float[Array, "L F"] for JumpReLU, or None for ReLU.
    x: Float[Array, "L ... d_model"], each layer's input (cast to W_enc's dtype, as circuit-tracer
      does).
    bandwidth: the JumpReLU STE's kernel width (only the gradient uses it).

  Returns:
    Float[Array, "L ... F"], in W_enc's dtype.
  """
  x = x.astype(W_enc.dtype)
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  pre = jnp.einsum("lnd,ldf->lnf", flat, W_enc) + b_enc[:, None, :]
  pre = pre.reshape(x.shape[:-1] + (W_enc.shape[-1],))
  if threshold is None:
    return jax.nn.relu(pre)
  return jumprelu(pre, _per_layer(threshold, pre.ndim).astype(pre.dtype), bandwidth)
