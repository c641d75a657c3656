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
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models.config import ModelConfig
from jaxinterp.models.norms import Norm, _wide
from jaxinterp.models.sites import Sites
from jaxinterp.models.transformer import (
    Block,
    forward,
    layers_uniform,
    positions_of,
    site_names,
)
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
    resid: Float[Array, "L+1 pos d_model"], the residual stream entering each block and
      `ln_final` (the points `LayeredVJP` linearises each block at).
  """

  logits: Array
  inputs: Array
  outputs: Array
  embed: Array
  resid: Array | None = None


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
  resid_names = tuple(f"blocks.{i}.hook_resid_pre" for i in range(L)) + (
      f"blocks.{L - 1}.hook_resid_post",)
  names = ("hook_embed", "ln_final.hook_normalized") + tuple(
      sites.output_at(i) for i in range(L)) + resid_names
  logits, cache = forward(cfg, params, tokens[None], interventions=iv, collect=names)
  final = cache["ln_final.hook_normalized"][0]
  inputs = tuple(store[i] for i in range(L))
  run = Run(logits=logits[0], inputs=stop(jnp.stack(inputs)),
            outputs=stop(jnp.stack([cache[sites.output_at(i)][0] for i in range(L)])),
            embed=stop(cache["hook_embed"][0]),
            resid=stop(jnp.stack([cache[n][0] for n in resid_names])))
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


@functools.partial(jax.jit, static_argnums=0)
def replacement_forward(cfg: ModelConfig, params: Mapping[str, Any], tc: Transcoders,
            tokens: Array) -> tuple[Targets, Run]:
  """`linearize`'s targets and run, without its VJP: what the layered backward (`layered_vjp`)
  needs. One compiled forward, about half the compile of the linearisation, bitwise the same
  values."""
  P, d, L = tokens.shape[0], cfg.d_model, cfg.n_layers
  dtype = params["W_E"].dtype
  zeros = Sources(jnp.zeros((P, d), dtype), tuple(jnp.zeros((P, d), dtype) for _ in range(L)))
  return replacement_run(cfg, params, tc, tokens, zeros)


def has_layered_vjp(cfg: ModelConfig) -> bool:
  """Whether `layered_vjp` applies to this model: its blocks share one structure."""
  return layers_uniform(cfg)


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


@flax.struct.dataclass
class LayeredVJP:
  """The replacement run's VJP block by block (`layered_vjp`), so that a batch of targets at
  layers <= `top` runs the backward pass through blocks `top`, ..., 0 only: a `fori_loop` whose
  start is data (one compiled program for every `top`), each step the VJP of one block,
  re-linearised at that block's input from the forward (the primal is one prompt, the cotangents
  a batch: the re-run costs 1/batch of the step).

  Attributes:
    cfg: the model (static). tc: the transcoders.
    blocks: the blocks' params stacked on a leading layer axis (`stack_blocks`).
    ln_final: `ln_final`'s params.
    resid: Float[Array, "L+1 pos d_model"], the residual stream entering each block and ln_final.
    local: None, or Bool[Array, "L"], each layer's type (`layer_types_as_data`).
  """

  cfg: ModelConfig = flax.struct.field(pytree_node=False)
  tc: Transcoders
  blocks: Any
  ln_final: Any
  resid: Array
  local: Array | None = None


def layered_vjp(cfg: ModelConfig, params: Mapping[str, Any], tc: Transcoders,
                run: Run) -> LayeredVJP | None:
  """The block-by-block VJP of `run`, or None where the blocks differ in structure
  (`layers_uniform`: e.g. Gemma-2's alternating sliding-window layers), where only `linearize`'s
  whole-run VJP applies."""
  if not has_layered_vjp(cfg) or run.resid is None:
    return None
  local = (jnp.asarray([li in cfg.sliding_layers for li in range(cfg.n_layers)])
           if cfg.layer_types_as_data else None)
  cfg = dataclasses.replace(cfg, final_logit_softcap=None)
  return LayeredVJP(cfg, tc, _stacked(cfg, params), params.get("ln_final", {}), run.resid, local)


def _stacked(cfg: ModelConfig, params: Mapping[str, Any]) -> Any:
  """`stack_blocks`' stacked block params, stacked on the host and put on the device: no compiled
  program (eager `jnp.stack`, and `jnp.asarray` of a host array, compile one per weight shape)."""
  blocks = [params[f"blocks_{layer}"] for layer in range(cfg.n_layers)]
  return jax.tree.map(lambda *xs: jax.device_put(np.stack([np.asarray(x) for x in xs])), *blocks)


def _block(lv: LayeredVJP, li: Array, x: Array, src: Array) -> tuple[Array, Array]:
  """Block `li` (traced) of the replacement run on `x` [1, pos, d_model] with `src` [1, pos,
  d_model] added at its MLP output site, with `replacement_run`'s interventions: (the residual
  stream after the block [1, pos, d_model], the transcoder input read [pos, d_model])."""
  cfg, tc = lv.cfg, lv.tc
  sites = hooks.sites_for(cfg, tc.input_hook, tc.output_hook)
  store: dict[str, Array] = {}
  iv: dict[str, Any] = {n: stop for n in frozen_sites(cfg) if n.startswith("blocks.0.")}

  def read(v):
    store["in"] = v[0]
    return v

  def standardize(inv):
    inv = stop(inv)
    store["in"] = _standardized(cfg, store["in"], inv[0])
    return inv

  def replace(v):
    skip = _skip(tc, li, store["in"])[None].astype(v.dtype)
    return skip + stop(v - skip) + src.astype(v.dtype)

  iv[sites.input_at(0)] = read
  iv[sites.output_at(0)] = replace
  if sites.standardize and "blocks.0.ln2.hook_scale" in iv:
    iv["blocks.0.ln2.hook_scale"] = standardize
  block_sites = Sites(iv)
  p_l = jax.tree.map(lambda a: a[li], lv.blocks)
  local = None if lv.local is None else lv.local[li]
  key_mask = jnp.ones(x.shape[:2], bool)
  y = Block(cfg, 0).apply({"params": p_l}, x, positions_of(key_mask), key_mask, block_sites, None,
                          None, local)
  block_sites.check_all_visited()
  return y, store["in"]


def layered_backward(lv: LayeredVJP, top: Array, like: Targets, layers: Array, positions: Array,
                     vectors: Array, reduce: Callable[[Array, Array], Any] | None = None
                     ) -> tuple[Array, Any]:
  """The VJP of a batch of targets through blocks `top`, ..., 0 only (every target at a layer
  <= `top`; the logits, layer L, need `top` = L - 1).

  Args:
    top: Int[Array, ""], traced. like: the run's `Targets` (their dtypes).
    layers: Int[Array, "B"] (L: the logits, read at `ln_final`'s output); positions: Int[Array,
      "B"]; vectors: Float[Array, "B d_model"], each target's reading vector.
    reduce: `reduce(layer, gradient)` maps the gradient at a layer's MLP output (Float[Array, "B
      pos d_model"]; the layer traced) to a pytree of `[B, ...]` arrays, kept instead of the
      gradient (e.g. its contraction with that layer's decoder vectors); None: the gradient.
  Returns:
    (the gradients at the embeddings Float[Array, "B pos d_model"], the layers' `reduce` outputs
    stacked on axis 1, e.g. Float[Array, "B L pos d_model"] without `reduce`; zero above `top`).
  """
  cfg = lv.cfg
  L, (_, P, d), B = cfg.n_layers, lv.resid.shape, layers.shape[0]
  at_pos = jnp.arange(P)[None, :] == positions[:, None]  # [B, pos]

  def cotangent(layer, dtype):  # [B, pos, d_model]: each target's vector where it reads
    hit = (at_pos & (layers == layer)[:, None])[..., None]
    return jnp.where(hit, vectors[:, None, :], 0).astype(dtype)

  x_final = lv.resid[L][None]
  _, vjp_final = jax.vjp(
      lambda x: Norm(cfg).apply({"params": lv.ln_final}, x, Sites({"ln_final.hook_scale": stop}),
                                "ln_final.hook_scale"), x_final)
  (g,) = jax.vmap(vjp_final)(cotangent(L, like.final.dtype)[:, None])  # [B, 1, pos, d_model]

  def step(i, carry):
    g, outs = carry
    li = top - i
    x = jax.lax.dynamic_index_in_dim(lv.resid, li, keepdims=True)
    _, vjp = jax.vjp(functools.partial(_block, lv, li), x, jnp.zeros_like(x))
    g, src = jax.vmap(vjp)((g, cotangent(li, like.inputs[0].dtype)))
    return g, jax.tree.map(lambda o, y: jax.lax.dynamic_update_index_in_dim(o, y, li, 1), outs,
                           reduce(li, src[:, 0]))

  if reduce is None:
    def reduce(li, src):
      return src
  shapes = jax.eval_shape(reduce, top, jax.ShapeDtypeStruct((B, P, d), lv.resid.dtype))
  outs = jax.tree.map(lambda s: jnp.zeros((B, L) + s.shape[1:], s.dtype), shapes)
  g, outs = jax.lax.fori_loop(0, top + 1, step, (g, outs))
  return g[:, 0], outs
