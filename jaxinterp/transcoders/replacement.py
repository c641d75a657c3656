"""The local replacement model of one prompt, as circuit-tracer defines it (Ameisen et al. 2025,
"Circuit Tracing", section "Building an attribution graph").

One forward of the model with interventions at its sites (no second forward):

- every attention pattern (`attn.hook_pattern`) and every norm's scale (`ln1`, `ln2`, the post-norms
  and `ln_final`'s `hook_scale`) pass through `stop_gradient`, so that attention and the norms are
  linear maps of the residual stream;
- each layer's MLP output site is replaced by `skip(x) + stop_gradient(mlp_out - skip(x))`: its
  value is unchanged (the transcoder's reconstruction plus the frozen error term), and its only
  gradient is the transcoders' linear skip connection (none without `W_skip`);
- the logit softcap is removed (`final_logit_softcap=None`): the logit nodes read `ln_final`'s
  output along unembedding directions, before any softcap.

The run is then affine in what it adds at the sources (the token embeddings at `hook_embed`,
each layer's MLP output site) and what it reads at the targets (each layer's transcoder input,
`ln_final`'s output). `linearize` returns that map's VJP: a cotangent at a target (a feature's
encoder vector at its layer and position, or a logit's direction at the last position) gives the
gradient at every source, which dotted with a source's vector (a feature's activation times its
decoder vector, an error vector, a token embedding) is the direct effect of circuit-tracer's
adjacency. The features and the error at position 0 (BOS) are zeroed (`active_features`,
`error_vectors`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxinterp.models.config import ModelConfig
from jaxinterp.models.norms import _wide
from jaxinterp.models.transformer import forward, site_names
from jaxinterp.transcoders import hooks
from jaxinterp.transcoders.clt import CrossLayerTranscoder
from jaxinterp.transcoders.plt import PerLayerTranscoders

Array = jax.Array
Transcoders = PerLayerTranscoders | CrossLayerTranscoder
stop = jax.lax.stop_gradient


def frozen_sites(cfg: ModelConfig) -> list[str]:
  """Every attention pattern and norm scale site of the model (the sites frozen)."""
  return [n for n in site_names(cfg) if n.endswith((".hook_pattern", ".hook_scale"))]


def _skip(tc: Transcoders, layer: int, x: Array) -> Array:
  """Layer `layer`'s skip connection `x @ W_skip[layer]` (zeros without one), in x's dtype."""
  if tc.W_skip is None:
    return jnp.zeros_like(x)
  return (x.astype(tc.dtype) @ tc.W_skip[layer]).astype(x.dtype)


def _standardized(cfg: ModelConfig, x: Array, inv: Array) -> Array:
  """ln2's standardisation of x (`ln2.hook_normalized`, before the gain), `(x - mean) * inv` or
  `x * inv` as `Norm.standardize` computes it, with the given (frozen) inverse scale."""
  xf = _wide(x)
  if cfg.normalization == "layernorm":
    return (xf - jnp.mean(xf, -1, keepdims=True)) * inv
  return xf * inv


@flax.struct.dataclass
class Sources:
  """What the replacement run adds at its sources (zeros: the run itself).

  Attributes:
    embed: Float[Array, "pos d_model"], added at `hook_embed`.
    outputs: tuple of L Float[Array, "pos d_model"], added at each layer's MLP output site.
  """

  embed: Array
  outputs: tuple


@flax.struct.dataclass
class Targets:
  """What the replacement run reads at its targets.

  Attributes:
    inputs: tuple of L Float[Array, "pos d_model"], each layer's transcoder input.
    final: Float[Array, "pos d_model"], `ln_final`'s output (the unembedding's input).
  """

  inputs: tuple
  final: Array


@flax.struct.dataclass
class Run:
  """The forward's values.

  Attributes:
    logits: Float[Array, "pos vocab"] without softcap.
    inputs: Float[Array, "L pos d_model"], each layer's transcoder input.
    outputs: Float[Array, "L pos d_model"], each layer's MLP output (the site the transcoders
      replace).
    embed: Float[Array, "pos d_model"], the token embeddings at `hook_embed`.
  """

  logits: Array
  inputs: Array
  outputs: Array
  embed: Array


def replacement_run(cfg: ModelConfig, params: Mapping[str, Any], tc: Transcoders, tokens: Array,
                    sources: Sources) -> tuple[Targets, Run]:
  """One forward of the local replacement model. tokens: Int[Array, "pos"] (BOS first)."""
  L = cfg.n_layers
  cfg = dataclasses.replace(cfg, final_logit_softcap=None)
  sites = hooks.sites_for(cfg, tc.input_hook, tc.output_hook)
  store: dict[int, Array] = {}
  iv: dict[str, Any] = {name: stop for name in frozen_sites(cfg)}
  iv["hook_embed"] = lambda x: x + sources.embed[None].astype(x.dtype)

  def read(layer, x):
    store[layer] = x[0]
    return x

  def standardize(layer, inv):  # ln2's scale, frozen, and the standardised input it gives
    inv = stop(inv)
    store[layer] = _standardized(cfg, store[layer], inv[0])
    return inv

  def replace(layer, x):
    skip = _skip(tc, layer, store[layer])[None].astype(x.dtype)
    return skip + stop(x - skip) + sources.outputs[layer][None].astype(x.dtype)

  for layer in range(L):
    if sites.input_at(layer) == sites.output_at(layer):
      raise ValueError("a transcoder's input and output sites must differ")
    iv[sites.input_at(layer)] = functools.partial(read, layer)
    iv[sites.output_at(layer)] = functools.partial(replace, layer)
    if sites.standardize and f"blocks.{layer}.ln2.hook_scale" in iv:
      iv[f"blocks.{layer}.ln2.hook_scale"] = functools.partial(standardize, layer)
  names = ("hook_embed", "ln_final.hook_normalized") + tuple(
      sites.output_at(i) for i in range(L))
  logits, cache = forward(cfg, params, tokens[None], interventions=iv, collect=names)
  final = cache["ln_final.hook_normalized"][0]
  inputs = tuple(store[i] for i in range(L))
  run = Run(logits=logits[0], inputs=stop(jnp.stack(inputs)),
            outputs=stop(jnp.stack([cache[sites.output_at(i)][0] for i in range(L)])),
            embed=stop(cache["hook_embed"][0]))
  return Targets(inputs, final), run


@functools.partial(jax.jit, static_argnames=("cfg",))
def linearize(cfg: ModelConfig, params: Mapping[str, Any], tc: Transcoders, tokens: Array):
  """The replacement run and its VJP at zero sources.

  Returns (targets: the `Targets` read, run: `Run`, vjp: a pytree function `Targets ->
  (Sources,)`, linear, for `jax.vmap`).
  """
  P, d, L = tokens.shape[0], cfg.d_model, cfg.n_layers
  dtype = params["W_E"].dtype
  zeros = Sources(jnp.zeros((P, d), dtype), tuple(jnp.zeros((P, d), dtype) for _ in range(L)))
  targets, vjp, run = jax.vjp(lambda s: replacement_run(cfg, params, tc, tokens, s), zeros,
                              has_aux=True)
  return targets, run, vjp


def active_features(tc: Transcoders, inputs: Array, zero_positions: int = 1) -> Array:
  """Feature activations with the first `zero_positions` positions (BOS) zeroed.

  inputs: Float[Array, "L pos d_model"] -> Float[Array, "L pos F"].
  """
  f = tc.encode(inputs)
  return f.at[:, :zero_positions].set(0)


def error_vectors(tc: Transcoders, run: Run, features: Array, zero_positions: int = 1) -> Array:
  """The MLP outputs minus the transcoders' reconstructions, zero at BOS: Float[Array,
  "L pos d_model"]."""
  recon = tc.decode(features, run.inputs).astype(run.outputs.dtype)
  return (run.outputs - recon).at[:, :zero_positions].set(0)
