"""The MLP: plain (GPT-2, NeoX) or gated (Llama family), with TransformerLens sites
(`blocks.{l}.mlp.`): `hook_pre`, `hook_pre_linear` (gated), `hook_post`, and `hook_out`, the MLP's
output before any post-MLP norm (circuit-tracer's `mlp.hook_out`)."""

from __future__ import annotations

import flax.linen as nn
import jax

from .config import ModelConfig
from .sites import Sites

Array = jax.Array
_init = nn.initializers.normal(0.02)


def activation(name: str, x: Array) -> Array:
  if name == "gelu_new" or name == "gelu_pytorch_tanh":
    return jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "silu":
    return jax.nn.silu(x)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"unknown activation {name!r}")


class MLP(nn.Module):
  cfg: ModelConfig
  layer: int

  def setup(self):
    c = self.cfg
    self.W_in = self.param("W_in", _init, (c.d_model, c.d_mlp))
    if c.gated_mlp:
      self.W_gate = self.param("W_gate", _init, (c.d_model, c.d_mlp))
    self.W_out = self.param("W_out", _init, (c.d_mlp, c.d_model))
    if c.mlp_bias:
      self.b_in = self.param("b_in", nn.initializers.zeros, (c.d_mlp,))
      self.b_out = self.param("b_out", nn.initializers.zeros, (c.d_model,))

  def __call__(self, x: Array, sites: Sites) -> Array:
    c, p = self.cfg, f"blocks.{self.layer}.mlp."
    b_in = self.b_in if c.mlp_bias else 0.0
    b_out = self.b_out if c.mlp_bias else 0.0
    if c.gated_mlp:
      pre = sites(p + "hook_pre", x @ self.W_gate)
      pre_linear = sites(p + "hook_pre_linear", x @ self.W_in + b_in)
      post = activation(c.act_fn, pre) * pre_linear
    else:
      post = activation(c.act_fn, sites(p + "hook_pre", x @ self.W_in + b_in))
    post = sites(p + "hook_post", post)
    return sites(p + "hook_out", post @ self.W_out + b_out)
