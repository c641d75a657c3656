"""One decoder-only transformer in Flax Linen, written to be used as a pure function.

`forward(cfg, params, tokens, ...)` is `Transformer(cfg).apply({"params": params}, ...)`: the params
are a plain nested dict of arrays, interventions and edge weights are explicit arguments, and the
only outputs are the logits and (optionally) the collected activations. `jit`, `grad` and `vmap`
apply to every array argument.

Parameter names follow TransformerLens (`W_Q: [head, d_model, d_head]`, `W_O: [head, d_head,
d_model]`, `W_in: [d_model, d_mlp]`, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from . import edges as E
from .attention import Attention, KVPrefix
from .config import ModelConfig
from .mlp import MLP, activation
from .norms import Norm, _wide
from .sites import Sites

__all__ = ["MLP", "Attention", "Block", "KVPrefix", "LayerStart", "Norm", "Transformer",
           "activation", "embed_inputs", "forward", "init_params", "last_token_logits",
           "layers_uniform", "positions_of", "run_blocks", "sender_outputs", "site_names",
           "stack_blocks", "unembedding", "ungroup_kv"]

Array = jax.Array
_init = nn.initializers.normal(0.02)


class Block(nn.Module):
  cfg: ModelConfig
  layer: int

  def setup(self):
    c = self.cfg
    self.ln1 = Norm(c, identity=not c.pre_norms)
    self.ln2 = Norm(c, identity=not c.pre_norms)
    if c.post_norms:
      self.ln1_post = Norm(c)
      self.ln2_post = Norm(c)
    self.attn = Attention(c, self.layer)
    self.mlp = MLP(c, self.layer)

  def __call__(self, resid: Array, positions: Array, key_mask: Array, sites: Sites,
               graph: E.GraphState | None, prefix: KVPrefix | None = None,
               local: Array | None = None) -> Array:
    """One block. `local`: the layer's type (sliding or not) as a traced bool, in the scan over
    blocks of a config with `layer_types_as_data`; None reads it from the config."""
    c, layer = self.cfg, self.layer
    p = f"blocks.{layer}."
    resid_pre = sites(p + "hook_resid_pre", resid)

    # Attention inputs: per head (split) when a per-head input site or the edge weights ask for it
    # (a graph that only records the senders needs no per-head inputs).
    weighted = graph is not None and graph.patch.weights is not None
    split = weighted or any(sites.wants(p + f"hook_{x}_input") for x in "qkv")
    if split:
      H = c.n_heads
      if weighted:
        corr = graph.correction(E.n_upstream_of_attn(c, layer), E.head_receiver(c, layer, 0, "q"),
                                3 * H)
        ins = [resid_pre[:, :, None, :] - corr[:, :, i * H:(i + 1) * H] for i in range(3)]
      else:
        ins = [jnp.broadcast_to(resid_pre[:, :, None, :], resid_pre.shape[:2] + (H, c.d_model))] * 3
      ins = [sites(p + f"hook_{x}_input", a) for x, a in zip("qkv", ins, strict=True)]
      q_in, k_in, v_in = [self.ln1(a) for a in ins]
    else:
      q_in = k_in = v_in = sites(p + "ln1.hook_normalized",
                                 self.ln1(resid_pre, sites, p + "ln1.hook_scale"))

    want_result = graph is not None
    attn_out, result = self.attn(q_in, k_in, v_in, positions=positions, key_mask=key_mask,
                                 sites=sites, split=split, want_result=want_result, prefix=prefix,
                                 local=local)
    if c.post_norms:
      if result is not None:  # post-norm is linear given its scale: split it over the heads
        result = result * self.ln1_post.scale(attn_out)[:, :, None, :].astype(result.dtype)
      attn_out = self.ln1_post(attn_out, sites, p + "ln1_post.hook_scale")
    attn_out = sites(p + "hook_attn_out", attn_out)
    if graph is not None:
      graph.add_senders(result)

    if c.parallel_attn_mlp:
      mlp_resid = resid_pre
    else:
      mlp_resid = sites(p + "hook_resid_mid", resid_pre + attn_out)
    if weighted:
      corr = graph.correction(E.n_upstream_of_mlp(c, layer), E.mlp_receiver(c, layer), 1)
      mlp_in = mlp_resid - corr[:, :, 0]
    else:
      mlp_in = mlp_resid
    mlp_in = sites(p + "ln2.hook_normalized", self.ln2(mlp_in, sites, p + "ln2.hook_scale"))
    mlp_out = self.mlp(mlp_in, sites)
    if c.post_norms:
      mlp_out = self.ln2_post(mlp_out, sites, p + "ln2_post.hook_scale")
    mlp_out = sites(p + "hook_mlp_out", mlp_out)
    if graph is not None:
      graph.add_senders(mlp_out[:, :, None, :])
    if c.parallel_attn_mlp:
      return sites(p + "hook_resid_post", resid_pre + attn_out + mlp_out)
    return sites(p + "hook_resid_post", mlp_resid + mlp_out)


@flax.struct.dataclass
class LayerStart:
  """Start the forward at block `layer` from a known residual stream (e.g. cached from a clean run).

  Attributes:
    layer: the first block to run (static); `n_layers` runs only the final norm and unembedding.
    resid: Float[Array, "batch pos d_model"], the residual stream entering that block.
    delta_prefix: in the graph form, Float[Array, "batch pos n_up d_model"]: (live - ablated) of the
      senders before that block, n_up = `edges.n_upstream_of_attn(cfg, layer)`.
    positions: None, or Int[Array, "batch pos"], the position ids of resid's positions (with
      `kv_prefix`: each row's positions after its prefix).
    kv_prefix: None, or a `KVPrefix` with a leading [n_layers] axis: every block from `layer` on
      also attends to its layer's keys and values of earlier positions (as `run_blocks(prefix=)`).
  """

  layer: int = flax.struct.field(pytree_node=False)
  resid: Array
  delta_prefix: Array | None = None
  positions: Array | None = None
  kv_prefix: KVPrefix | None = None


class Transformer(nn.Module):
  """The decoder. Call through `forward`, which builds the per-call `Sites`."""

  cfg: ModelConfig
  remat: bool = False

  def setup(self):
    c = self.cfg
    self.W_E = self.param("W_E", _init, (c.d_vocab, c.d_model))
    if c.positional == "learned":
      self.W_pos = self.param("W_pos", _init, (c.n_ctx, c.d_model))
    # With remat, each block's activations are recomputed in the backward pass (sites and the graph
    # state are static side inputs, hashed by identity).
    block_cls = nn.remat(Block, static_argnums=(4, 5)) if self.remat else Block
    self.blocks = [block_cls(c, layer, name=f"blocks_{layer}") for layer in range(c.n_layers)]
    self.ln_final = Norm(c)
    if not c.tied_embeddings:
      self.W_U = self.param("W_U", _init, (c.d_model, c.vocab_out))
    if c.unembed_bias:
      self.b_U = self.param("b_U", nn.initializers.zeros, (c.vocab_out,))

  def __call__(self, tokens: Array, attention_mask: Array | None, sites: Sites,
               edges: E.EdgePatch | None = None, embed_override: Array | None = None,
               start: LayerStart | None = None) -> Array:
    c = self.cfg
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, bool)
    key_mask = attention_mask.astype(bool)
    positions = positions_of(key_mask)
    graph = E.GraphState(edges) if edges is not None else None
    first, kv_prefix = 0, None
    if start is not None:  # continue a run whose layers before start.layer are known
      first, resid, kv_prefix = start.layer, start.resid, start.kv_prefix
      if start.positions is not None:
        positions = start.positions
      if graph is not None:
        graph.set_prefix(start.delta_prefix)
    else:
      if embed_override is not None:  # e.g. interpolated input embeddings for EAP-IG
        resid = embed_override
      else:
        resid = self.embed(tokens, attention_mask, sites)
      if graph is not None:
        graph.add_senders(resid[:, :, None, :])
    for layer in range(first, c.n_layers):
      kv = (None if kv_prefix is None
            else jax.tree.map(lambda a, layer=layer: a[layer], kv_prefix))
      resid = self.blocks[layer](resid, positions, key_mask, sites, graph, kv)
    if graph is not None:
      if edges.weights is not None:
        resid = resid - graph.correction(E.n_senders(c), E.logits_receiver(c), 1)[:, :, 0]
      if sites.wants("hook_senders"):  # every sender's output in this run: [batch, pos, sender, d]
        sites("hook_senders", jnp.concatenate(graph.outputs, 2))
    x = sites("ln_final.hook_normalized", self.ln_final(resid, sites, "ln_final.hook_scale"))
    W_U = self.W_E.T if c.tied_embeddings else self.W_U
    logits = _wide(x @ W_U)
    if c.unembed_bias:
      logits = logits + self.b_U
    if c.final_logit_softcap:
      logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
    return logits

  def embed(self, tokens: Array, attention_mask: Array | None = None,
            sites: Sites | None = None) -> Array:
    """The input node's output (token + position embedding): `[batch, pos, d_model]`."""
    c = self.cfg
    sites = sites if sites is not None else Sites()
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, bool)
    positions = positions_of(attention_mask)
    x = self.W_E[tokens]
    if c.embed_scale != 1.0:
      x = x * jnp.asarray(c.embed_scale, x.dtype)
    x = sites("hook_embed", x)
    if c.positional == "learned":
      x = x + sites("hook_pos_embed", self.W_pos[positions])
    return x


def forward(cfg: ModelConfig, params: Mapping[str, Any], tokens: Array, *,
            attention_mask: Array | None = None,
            interventions: Mapping[str, Any] | None = None,
            collect: Iterable[str] = (),
            edges: E.EdgePatch | None = None,
            input_embeds: Array | None = None,
            remat: bool = False,
            start: LayerStart | None = None):
  """The model as a pure function.

  Args:
    cfg: the architecture (static).
    params: nested dict of arrays, as returned by `from_pretrained(...).params`.
    tokens: Int[Array, "batch pos"].
    attention_mask: Bool[Array, "batch pos"]; False marks padding (right padding keeps the logits at
      real positions unchanged).
    interventions: site name -> callable `x -> x'` (see `jaxinterp.interventions`), applied in
    order. collect: site names whose (post-intervention) values are returned.
    edges: an `EdgePatch` for the graph-form forward (edge weights as an argument). The site
      `hook_senders` (`[batch, pos, sender, d_model]`, every sender's output) exists only then.
    input_embeds: Float[Array, "batch pos d_model"]; replaces the input node's output (token plus
      position embedding), e.g. interpolated embeddings for EAP-IG.
    remat: rematerialise each block in the backward pass (saves memory under `grad`).
    start: a `LayerStart` to skip the blocks before a layer whose input is already known (exact
      patching reuses the clean run's upstream activations this way).

  Returns:
    logits Float[Array, "batch pos vocab"] if `collect` is empty, else (logits, {site: value}).
  """
  sites = Sites(interventions, collect)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, pos], got shape {tokens.shape}")

  if remat and sites.collect:
    raise ValueError("remat=True cannot be combined with collect (collected values would be "
                     "recomputed inside the backward pass)")
  if remat and edges is not None and edges.weights is not None and edges.live is None:
    raise ValueError("remat=True needs EdgePatch.live (fixed sender values), as attribution uses")
  logits = Transformer(cfg, remat).apply({"params": params}, tokens, attention_mask, sites, edges,
                                         input_embeds, start)
  sites.check_all_visited()
  if sites.collect:
    return logits, dict(sites.cache)
  return logits


def last_token_logits(cfg: ModelConfig, params: Mapping[str, Any], x: Array, last: Array) -> Array:
  """Unembed only each example's last real position: Float[Array, "batch 1 vocab"] (float32).

  x is `ln_final.hook_normalized` [batch, pos, d_model]. Every task metric reads the logits at
  `batch.last` only, so the metric can be applied to these with `last = 0`. This skips the
  [batch*pos, d_model] x [d_model, vocab] unembedding (and its transpose in the backward pass),
  which for GPT-2 small at 24 positions is ~30% of a forward's FLOPs.
  """
  xl = jnp.take_along_axis(x, last[:, None, None].astype(jnp.int32), axis=1)  # [b, 1, d]
  W_U = params["W_E"].T if cfg.tied_embeddings else params["W_U"]
  logits = (xl @ W_U).astype(jnp.promote_types(xl.dtype, jnp.float32))
  if cfg.unembed_bias:
    logits = logits + params["b_U"]
  if cfg.final_logit_softcap:
    logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
  return logits


def unembedding(cfg: ModelConfig, params: Mapping[str, Any]) -> Array:
  """The unembedding W_U, Float[Array, "d_model vocab_out"] (W_E transposed when tied): the logits
  are `ln_final.hook_normalized @ W_U` (+ `b_U`), before any `final_logit_softcap`. A model without
  the softcap is `dataclasses.replace(cfg, final_logit_softcap=None)` with the same params."""
  return params["W_E"].T if cfg.tied_embeddings else params["W_U"]


def embed_inputs(cfg: ModelConfig, params: Mapping[str, Any], tokens: Array,
                 attention_mask: Array | None = None) -> Array:
  """Output of the `input` node: Float[Array, "batch pos d_model"]."""
  return Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), attention_mask,
                                method=Transformer.embed)


def init_params(cfg: ModelConfig, key: Array, dtype=jnp.float32) -> dict[str, Any]:
  """Random parameters (normal(0.02) weights, unit norms) for a config."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = Transformer(cfg).init(key, tokens, None, Sites())["params"]
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), dict(params))


def site_names(cfg: ModelConfig) -> list[str]:
  """Every site name the forward can expose, in execution order (optional ones included).

  Requesting a per-head `hook_{q,k,v}_input` switches that layer to split inputs, in which case its
  `ln1.hook_scale` and `ln1.hook_normalized` are not visited. The norms' `hook_scale` sites (each
  norm's inverse scale, `Norm.__call__`) exist where the norm is not the identity.
  """
  normed = cfg.normalization != "none"
  pre = [".hook_scale"] if normed and cfg.pre_norms else []
  post = [".hook_scale"] if normed and cfg.post_norms else []
  names = ["hook_embed"] + (["hook_pos_embed"] if cfg.positional == "learned" else [])
  for layer in range(cfg.n_layers):
    p = f"blocks.{layer}."
    names += [p + "hook_resid_pre"] + [p + f"hook_{x}_input" for x in "qkv"]
    names += [p + "ln1" + s for s in pre] + [p + "ln1.hook_normalized"]
    names += [p + "attn." + s for s in ("hook_q", "hook_k", "hook_v")]
    if cfg.qk_norm != "none":
      names += [p + "attn.hook_q_normed", p + "attn.hook_k_normed"]
    if cfg.positional == "rotary":
      names += [p + "attn.hook_rot_q", p + "attn.hook_rot_k"]
    names += [p + "attn." + s
              for s in ("hook_attn_scores", "hook_pattern", "hook_z", "hook_result")]
    names += [p + "ln1_post" + s for s in post] + [p + "hook_attn_out"]
    if not cfg.parallel_attn_mlp:
      names += [p + "hook_resid_mid"]
    names += [p + "ln2" + s for s in pre] + [p + "ln2.hook_normalized", p + "mlp.hook_pre"]
    if cfg.gated_mlp:
      names += [p + "mlp.hook_pre_linear"]
    names += [p + "mlp.hook_post", p + "mlp.hook_out"] + [p + "ln2_post" + s for s in post]
    names += [p + "hook_mlp_out", p + "hook_resid_post"]
  final = ["ln_final.hook_scale"] if normed else []
  return names + final + ["ln_final.hook_normalized"]


def ungroup_kv(cfg: ModelConfig, params: Mapping[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
  """The same model with one key/value head per query head (GQA weights repeated, MHA unchanged).

  The logits are unchanged; every query head then has its own `hook_k`/`hook_v` (as
  TransformerLens's `ungroup_grouped_query_attention`), which is how the edge graph treats GQA
  models.
  """
  rep = cfg.n_heads // cfg.kv_heads
  if rep == 1:
    return cfg, params
  params = dict(params)
  for layer in range(cfg.n_layers):
    blk = dict(params[f"blocks_{layer}"])
    attn = dict(blk["attn"])
    for name in ("W_K", "W_V", "b_K", "b_V", "k_norm"):
      if name in attn:
        attn[name] = jnp.repeat(attn[name], rep, 0)
    blk["attn"] = attn
    params[f"blocks_{layer}"] = blk
  return dataclasses.replace(cfg, n_kv_heads=None), params


def layers_uniform(cfg: ModelConfig) -> bool:
  """Whether the blocks can run as one `lax.scan`: every block has the same static structure, or
  the layers' types (sliding window, RoPE base) ride in the scan as data (`layer_types_as_data`).

  Gemma-2's alternating sliding-window layers are the exception (kept unscanned)."""
  return (cfg.layer_types_as_data or not cfg.sliding_layers
          or set(cfg.sliding_layers) == set(range(cfg.n_layers)))


def stack_blocks(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, Any]:
  """The blocks' params stacked on a leading layer axis (a copy), for `run_blocks`."""
  blocks = [params[f"blocks_{layer}"] for layer in range(cfg.n_layers)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def positions_of(attention_mask: Array) -> Array:
  """Position ids of right-padded rows: Int[Array, "batch pos"] (0 at padding's left edge)."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), -1) - 1, 0)


def run_blocks(cfg: ModelConfig, params: Mapping[str, Any], resid: Array, attention_mask: Array,
               interventions: Mapping[str, Any] | None = None, collect: Iterable[str] = (),
               record_senders: bool = False, stacked: Mapping[str, Any] | None = None,
               positions: Array | None = None, prefix: KVPrefix | None = None):
  """Run every block on a residual stream, with per-layer interventions given as stacked pytrees.

  With `stacked` (`stack_blocks(cfg, params)`, for configs whose blocks share one structure) the
  blocks run as one `lax.scan`, compiled once instead of once per layer (much faster compiles; costs
  a copy of the block weights). Without it they run one after the other from `params`.

  Args:
    resid: Float[Array, "batch pos d_model"], the residual stream entering block 0.
    attention_mask: Bool[Array, "batch pos"].
    interventions: site name *within a block* (e.g. `"attn.hook_q"`, `"hook_resid_post"`) -> an
      intervention pytree whose array leaves have a leading `[n_layers]` axis (layer l applies
      slice l).
    collect: site names within a block to return, stacked over layers.
    record_senders: also return "hook_senders", each block's sender outputs as the graph form
      records them ([n_layers, batch, pos, n_heads + 1, d_model]: the heads' results, then the MLP).
    positions: Int[Array, "batch pos"] position ids of resid's positions (default: those of right
      padding from 0); with `prefix`, where each row's positions start after its prefix.
    prefix: a `KVPrefix` whose arrays have a leading [n_layers] axis: every block's queries also
      attend to that layer's keys and values of earlier positions, so resid may hold only the
      positions after them.

  Returns:
    (Float[Array, "batch pos d_model"] residual after the last block, {name: [n_layers, ...]}).
  """
  key_mask = attention_mask.astype(bool)
  positions = positions_of(key_mask) if positions is None else positions
  collect = tuple(collect)
  interventions = dict(interventions or {})

  def one(layer, p_l, x, iv_l, kv_l, local=None):
    name = f"blocks.{layer}."
    sites = Sites({name + k: v for k, v in iv_l.items()}, [name + k for k in collect])
    graph = E.GraphState(E.EdgePatch(None, None)) if record_senders else None
    x = Block(cfg, layer).apply({"params": p_l}, x, positions, key_mask, sites, graph, kv_l,
                                local)
    sites.check_all_visited()
    ys = {k: sites.cache[name + k] for k in collect}
    if record_senders:
      ys["hook_senders"] = jnp.concatenate(graph.outputs, 2)
    return x, ys

  if stacked is not None:
    if not layers_uniform(cfg):
      raise ValueError("scanned blocks need one block structure; this config's sliding-window "
                       "layers differ from its other layers (pass stacked=None)")
    if cfg.layer_types_as_data:  # each layer's type is a scanned bool
      local = jnp.asarray([li in cfg.sliding_layers for li in range(cfg.n_layers)])
      return jax.lax.scan(lambda x, xs: one(0, xs[0], x, xs[1], xs[2], xs[3]), resid,
                          (stacked, interventions, prefix, local))
    return jax.lax.scan(lambda x, xs: one(0, xs[0], x, xs[1], xs[2]), resid,
                        (stacked, interventions, prefix))
  per_layer = []
  for li in range(cfg.n_layers):
    def at(tree, li=li):
      return jax.tree.map(lambda a: a[li], tree)

    resid, ys = one(li, params[f"blocks_{li}"], resid, at(interventions), at(prefix))
    per_layer.append(ys)
  return resid, jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer[0] else {}


def sender_outputs(cfg: ModelConfig, params, tokens: Array, mask: Array | None = None,
                   **kw) -> Array:
  """Every sender's output (input node, heads, MLPs): Float[Array, "batch pos sender d_model"]."""
  _, cache = forward(cfg, params, tokens, attention_mask=mask, edges=E.EdgePatch(None, None),
                     collect=("hook_senders",), **kw)
  return cache["hook_senders"]
