"""Fast EAP / EAP-IG kernels: gradients w.r.t. receiver inputs, contracted once per batch.

`eap.weight_gradient_batch` differentiates the graph-form forward w.r.t. the edge weights `w`: the
correction `einsum("bpsd,sr->bprd", delta, 1 - w)` (zero at `w = 1`) and its transpose run in every
forward and backward, and on XLA:CPU cost more than the transformer (benchmarks/RESULTS.md). Here
the same scores come from their linearity in the receiver gradients:

    score[s, r] = (1/m) sum_k sum_{b,pos} (ablated_s - clean_s) . dm/dx_r (alpha_k)

`ig_inputs_batch` (the kernel `attribute` uses): each IG step is one plain forward and backward with
fused heads, the LayerNorm/RMSNorm Jacobian folded into the contraction (see its docstring) so a
step keeps only `[batch, pos, 3H, d_head]` head gradients; the blocks run as one `lax.scan` when a
stacked copy of their weights fits; the clean and corrupted runs share one forward, the heads'
sender differences are projected once from their `hook_z` differences, and the contraction with the
sender differences happens once per batch, in position chunks that stay in cache
(`contraction.contract_positions`).

EAP-IG-activations runs the same kernel (`interpolate="activations"`): its steps interpolate one
layer node at a time instead of the input embeddings (`layer_node_steps`, `_step_inputs`).

`_split_ig_inputs_batch` is the direct form: zero perturbations at the per-head inputs
`blocks.{layer}.hook_{q,k,v}_input` and at residual sites, receiver gradients `[batch, pos,
receivers, d_model]` summed over the steps, one contraction per layer. It runs under `remat` (where
sites can't be collected). Every kernel equals `eap.weight_gradient_batch` up to float rounding
(tests/attribution/test_receiver_grads.py), and with the layer nodes
`ig_activations.weight_gradient_batch` (tests/attribution/test_ig_activations.py).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.attribution import contraction as C
from jaxinterp.attribution.base import Blend, Shift
from jaxinterp.models import edges as E
from jaxinterp.models import transformer as T
from jaxinterp.models.config import ModelConfig
from jaxinterp.runtime import compile_policy, shared_prefix
from jaxinterp.tasks import Batch
from jaxinterp.tasks.metrics import metric_at_last, metric_sum

# Blocks run as one lax.scan (fast compiles) when their weights take at most this fraction of the
# device's memory: the scan needs a stacked copy of them, which an 8B model can't spare on one GPU.
SCAN_MAX_FRACTION = 0.15
# The device memory that decision is made for: None, the default device's; a memory plan
# (`runtime.memory_plan`, --dry_run) sets the planned device's while it traces.
PLANNED_DEVICE_BYTES: int | None = None
# Each layer's outputs that the clean and corrupted rows' one forward keeps (`_run_pair`): the
# heads' mixed values z (a head's output is z_h W_O[h]) and the MLP's output. They give the patching
# sender differences, and EAP-IG-activations interpolates its layer nodes there.
LAYER_OUTPUTS = ("attn.hook_z", "hook_mlp_out")
# Where EAP-IG-activations blends a layer node under an ablation other than patching: the layer's
# summed head outputs and its MLP output, between the clean value and the one with each of the
# node's senders replaced by its ablated value (`ablated_blends`).
ABLATED_OUTPUTS = ("hook_attn_out", "hook_mlp_out")
# What the IG steps interpolate (`ig_inputs_batch(..., interpolate=)`): the input embeddings
# (EAP, EAP-IG-inputs, clean-corrupted) or each layer node's outputs in turn (EAP-IG-activations).
INTERPOLATE = ("inputs", "activations")
Array = jax.Array


def _device_memory_bytes() -> int:
  """Memory of the default device (host RAM for the CPU backend), or PLANNED_DEVICE_BYTES."""
  if PLANNED_DEVICE_BYTES is not None:
    return PLANNED_DEVICE_BYTES
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return 16 << 30


def scan_blocks_fits(cfg: ModelConfig, params) -> bool:
  """Whether `ig_inputs_batch` runs the blocks as one scan (uniform blocks, and a stacked copy of
  their weights within SCAN_MAX_FRACTION of the device memory) rather than layer by layer."""
  block_bytes = sum(x.size * x.dtype.itemsize for li in range(cfg.n_layers)
                    for x in jax.tree.leaves(params[f"blocks_{li}"]))
  return T.layers_uniform(cfg) and block_bytes <= SCAN_MAX_FRACTION * _device_memory_bytes()


def _eps_sites(cfg: ModelConfig, batch_shape: tuple, dtype) -> dict[str, Array]:
  """Zero perturbations for every site whose gradient the receiver gradients are built from."""
  b, p = batch_shape
  H, d = cfg.n_heads, cfg.d_model
  eps = {}
  for li in range(cfg.n_layers):
    for x in "qkv":
      eps[f"blocks.{li}.hook_{x}_input"] = jnp.zeros((b, p, H, d), dtype)
    mid = "hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"
    eps[f"blocks.{li}.{mid}"] = jnp.zeros((b, p, d), dtype)
    eps[f"blocks.{li}.hook_resid_post"] = jnp.zeros((b, p, d), dtype)
  return eps


def _receiver_grads(cfg: ModelConfig, g: dict[str, Array]) -> list[Array]:
  """Per-layer receiver gradients from the site gradients.

  Returns [G_0, ..., G_{L-1}, g_logits] with G_l: Float[Array, "batch pos 3H+1 d_model"] (q heads,
  k heads, v heads, MLP input: the receiver order of `models.edges`) and g_logits [batch, pos, d].
  The MLP input is not a site of its own: for a sequential block the residual after attention
  feeds the MLP and the residual stream, so dm/dx_mlp = G(resid_mid) - G(resid_post); for a parallel
  block the pre-residual also feeds the per-head attention inputs, which are subtracted too.
  """
  out = []
  for li in range(cfg.n_layers):
    q, k, v = (g[f"blocks.{li}.hook_{x}_input"] for x in "qkv")
    post = g[f"blocks.{li}.hook_resid_post"]
    if cfg.parallel_attn_mlp:
      mlp = g[f"blocks.{li}.hook_resid_pre"] - post - (q + k + v).sum(2)
    else:
      mlp = g[f"blocks.{li}.hook_resid_mid"] - post
    out.append(jnp.concatenate([q, k, v, mlp[:, :, None]], 2))
  out.append(g[f"blocks.{cfg.n_layers - 1}.hook_resid_post"])
  return out


def contract(cfg: ModelConfig, diff: Array, grads: list[Array]) -> Array:
  """Scores from sender differences and receiver gradients.

  Args:
    diff: Float[Array, "batch pos sender d_model"], ablated minus live sender outputs.
    grads: as returned by `_receiver_grads` (summed or averaged over steps as wanted).

  Returns:
    Float[Array, "sender receiver"] (float32), zero on invalid edges.
  """
  S, R, H = E.n_senders(cfg), E.n_receivers(cfg), cfg.n_heads
  b, p, _, d = diff.shape
  dT = jnp.moveaxis(diff, 2, 0).reshape(S, b * p * d).astype(jnp.float32)  # one transpose per batch
  scores = jnp.zeros((S, R), jnp.float32)
  for li in range(cfg.n_layers):
    G = grads[li].astype(jnp.float32)
    GT = jnp.moveaxis(G, 2, 0).reshape(3 * H + 1, b * p * d)
    n_attn, n_mlp = E.n_upstream_of_attn(cfg, li), E.n_upstream_of_mlp(cfg, li)
    r0 = E.head_receiver(cfg, li, 0, "q")
    scores = scores.at[:n_attn, r0:r0 + 3 * H].set(dT[:n_attn] @ GT[:3 * H].T)
    scores = scores.at[:n_mlp, r0 + 3 * H].set(dT[:n_mlp] @ GT[3 * H])
  g_log = grads[-1].astype(jnp.float32).reshape(b * p * d)
  return scores.at[:, E.logits_receiver(cfg)].set(dT @ g_log)


def _norms(cfg: ModelConfig, stacked_norm, method: str, *args):
  """A `Norm` method applied layer by layer: stacked params and args with a leading layer axis."""
  def one(p, *a):
    return T.Norm(cfg).apply({"params": p}, *a, method=getattr(T.Norm, method))
  return jax.vmap(one)(stacked_norm, *args)


def _stack(cfg: ModelConfig, params, *path: str) -> Array:
  """One block parameter stacked over layers, e.g. `_stack(cfg, params, "ln1", "w")`: [L, ...]."""
  def get(li):
    x = params[f"blocks_{li}"]
    for k in path:
      x = x[k]
    return x
  return jnp.stack([get(li) for li in range(cfg.n_layers)])


def _norm_params(cfg: ModelConfig, params, name: str) -> dict:
  """A block norm's params stacked over layers ({} for the param-free identity norm)."""
  return {k: _stack(cfg, params, name, k) for k in params["blocks_0"].get(name, {})}


def layer_node_steps(cfg: ModelConfig, alphas: Array) -> Array:
  """EAP-IG-activations' steps, Float[Array, "(1 + 2 n_layers) m 2"]: (layer node, alpha) for the
  input, then each layer's heads and its MLP (the `eap` package's order), each at every alpha."""
  G, m = 1 + 2 * cfg.n_layers, alphas.shape[0]
  return jnp.stack([jnp.repeat(jnp.arange(G), m).astype(alphas.dtype), jnp.tile(alphas, G)], 1)


def _step_inputs(cfg: ModelConfig, alphas: Array, e_clean: Array, e_corrupt: Array,
                 blends: tuple[dict, dict] | None):
  """(xs, inputs): the values the IG steps scan over and `inputs(x) -> (input embeddings,
  {site within a block: Blend with a leading [n_layers] axis})`.

  Without `blends`, xs are the alphas and the embeddings are interpolated from corrupted to clean.
  With `blends` ({site within a block: [n_layers, ...]}, clean and corrupted: the two runs'
  `LAYER_OUTPUTS`, or `ablated_blends`), xs are `layer_node_steps`: the step's layer node (one-hot
  `s` over the input, then each layer's heads and MLP, the sites in that order) is set to its clean
  and corrupted (ablated) values interpolated at alpha, the others run clean; the input node's
  corrupted value is `e_corrupt`.
  """
  dt = e_clean.dtype
  if blends is None:
    return alphas, lambda alpha: (e_corrupt + alpha.astype(dt) * (e_clean - e_corrupt), {})
  clean, corrupted = blends
  L, G = cfg.n_layers, 1 + 2 * cfg.n_layers

  def inputs(x):
    s = jax.nn.one_hot(x[0].astype(jnp.int32), G, dtype=dt)
    alpha = x[1].astype(dt)
    emb = e_clean + s[0] * (alpha * e_clean + (1 - alpha) * e_corrupt - e_clean)
    al = jnp.full((L,), alpha)
    return emb, {n: Blend(clean[n], corrupted[n], s[1 + k::2], al) for k, n in enumerate(clean)}

  return layer_node_steps(cfg, alphas), inputs


def _per_step(weights, x):
  """Weights that are not all float32 as a value of the IG step whose input is `x` (tied to it by
  an optimization barrier): XLA then converts them inside each step rather than hoisting that out
  of the steps' loop. XLA:CPU has no bf16 matmul, and hoisted it kept float32 copies of every bf16
  weight for the whole loop (a GPU multiplies bf16 natively). Values are unchanged; float32
  weights are returned as they are (their program is unchanged)."""
  if all(w.dtype == jnp.float32 for w in jax.tree.leaves(weights)):
    return weights
  return jax.lax.optimization_barrier((weights, x))[0]


def _ig_steps(cfg: ModelConfig, task, params, stacked, batch: Batch, alphas: Array,
              e_clean: Array, e_corrupt: Array, diff: Array, clean_logits: Array | None,
              positions: Array | None = None, prefix: T.KVPrefix | None = None,
              blends: tuple[dict, dict] | None = None):
  """The per-step part of `ig_inputs_batch`: one plain forward + backward per IG step (over the
  suffix positions only, given their `positions` and the clean `prefix`: `shared_prefix`); with
  `blends`, one per layer node and alpha (`_step_inputs`).

  Returns ((P_sum [L, batch, pos, 3H, d_head]: the head gradients scaled by 1/sigma, summed over
  steps; mlp_sum [L, batch, pos, d_model]: the MLP-input gradients; log_sum [batch, pos, d_model]:
  the logits-input gradient; t3 [L, sender, 3H]: the x_hat term of the norm correction), the metric
  values [steps, batch]).
  """
  L, H, d, dh = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
  b, p = batch.clean.shape
  dt = e_clean.dtype
  x_mlp = "hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"
  collect = tuple(dict.fromkeys(("hook_resid_pre", x_mlp, "attn.hook_q", "attn.hook_k",
                                 "attn.hook_v")))
  eps0 = {f"attn.hook_{c}": jnp.zeros((L, b, p, H, dh), dt) for c in "qkv"}
  eps0["ln2.hook_normalized"] = jnp.zeros((L, b, p, d), dt)
  eps0["final"] = jnp.zeros((b, p, d), dt)
  ln1, ln2 = _norm_params(cfg, params, "ln1"), _norm_params(cfg, params, "ln2")
  # The norm bias's and the projection bias's share of q/k/v: q - offset = (gamma x_hat) W_Q.
  def offset(li: int, c: str) -> Array:  # [H, d_head]
    attn = params[f"blocks_{li}"]["attn"]
    o = jnp.zeros((H, dh), jnp.float32)
    if cfg.attn_bias:
      o = o + attn[f"b_{c}"].astype(jnp.float32)
    if "b" in ln1:
      o = o + jnp.einsum("d,hde->he", ln1["b"][li], attn[f"W_{c}"],
                         preferred_element_type=jnp.float32)
    return o

  offsets = jnp.stack([jnp.concatenate([offset(li, c) for c in "QKV"]) for li in range(L)])

  xs, inputs = _step_inputs(cfg, alphas, e_clean, e_corrupt, blends)

  def f(eps, x):
    emb, iv = inputs(x)
    iv.update({n: Shift(e) for n, e in eps.items() if n != "final"})
    # The blocks' weights per step; the unembedding below reads `params` as it is, so XLA may
    # hoist its conversion out of the loop (inside the barrier it cost 2 GB more at 8B, bf16).
    weights, stack = _per_step((params, stacked), x)
    resid, ys = T.run_blocks(cfg, weights, emb, batch.mask, iv, collect, stacked=stack,
                           positions=positions, prefix=prefix)
    resid = resid + eps["final"]
    x = T.Norm(cfg).apply({"params": params.get("ln_final", {})}, resid)
    total, values = metric_at_last(cfg, task, params, batch, x, clean_logits)
    return total, (values, ys)

  def step(carry, x):
    P_sum, mlp_sum, log_sum, t3 = carry
    g, (values, ys) = jax.grad(f, has_aux=True)(eps0, x)
    xhat, inv = _norms(cfg, ln1, "standardize", ys["hook_resid_pre"])  # [L, b, p, d | 1]
    P = jnp.concatenate([g[f"attn.hook_{c}"] for c in "qkv"], 3).astype(jnp.float32)
    P = P * inv[..., None]  # [L, b, p, 3H, dh]
    qkv = jnp.concatenate([ys[f"attn.hook_{c}"] for c in "qkv"], 3).astype(jnp.float32)
    # The identity norm's Jacobian has no x_hat term: normalization "none" (tracr), and the
    # param-free block input norm of pre_norms=False (OLMo-2), whose `ln1` is {}.
    if cfg.normalization != "none" and ln1:
      coef = jnp.sum((qkv - offsets[:, None, None]) * P, -1) / d  # [L, b, p, 3H]
      # (D_s . x_hat_l) for every sender and layer: one [S, d] x [d, L] matmul per position.
      e = jnp.einsum("bpsd,bpld->bpsl", diff, jnp.moveaxis(xhat, 0, 2))
      t3 = t3 + jnp.einsum("bpsl,lbpr->lsr", e, coef)

    def mlp_grad(p_ln2, x, gy):
      _, vjp = jax.vjp(lambda x: T.Norm(cfg).apply({"params": p_ln2}, x), x)
      return vjp(gy)[0]

    g_mlp = jax.vmap(mlp_grad)(ln2, ys[x_mlp], g["ln2.hook_normalized"])
    carry = (P_sum + P, mlp_sum + g_mlp.astype(jnp.float32),
             log_sum + g["final"].astype(jnp.float32), t3)
    return carry, values

  zero = (jnp.zeros((L, b, p, 3 * H, dh), jnp.float32), jnp.zeros((L, b, p, d), jnp.float32),
          jnp.zeros((b, p, d), jnp.float32), jnp.zeros((L, diff.shape[2], 3 * H), jnp.float32))
  return jax.lax.scan(step, zero, xs)


def _senders(cfg: ModelConfig, params, stacked, emb: Array, mask: Array,
             sfx: shared_prefix.Suffix | None = None, outputs: tuple[str, ...] = ()):
  """Every sender's output ([batch, pos, sender, d_model], the input node first), the residual
  stream after the last block and, with a suffix `sfx`, the run's keys and values before it
  (`T.KVPrefix`, else None), and {site: [n_layers, ...]} of the `outputs` (sites within a block;
  none by default), from one T.forward of the blocks."""
  kv = shared_prefix.KV_SITES if sfx is not None else ()
  final, ys = T.run_blocks(cfg, params, emb, mask, collect=kv + outputs, record_senders=True,
                           stacked=stacked)
  per_layer = jnp.moveaxis(ys["hook_senders"], 0, 2)  # [b, p, L, H + 1, d]
  b, p = mask.shape
  senders = jnp.concatenate([emb[:, :, None], per_layer.reshape(b, p, -1, cfg.d_model)], 2)
  prefix = None if sfx is None else sfx.prefix(*(ys[k] for k in kv))
  return senders, final, prefix, {k: ys[k] for k in outputs}


def ablated_blends(cfg: ModelConfig, clean: dict[str, Array], diff: Array
                   ) -> tuple[dict[str, Array], dict[str, Array]]:
  """EAP-IG-activations' layer-node endpoints under an ablation other than patching.

  Args:
    clean: the clean run's `ABLATED_OUTPUTS`, {site: Float[Array, "layer batch pos d_model"]}.
    diff: Float[Array, "batch pos sender d_model"], ablated minus clean sender outputs.

  Returns:
    (clean, ablated): the ablated value of a layer's attention output is the clean one plus its
    heads' differences (every head ablated, the bias kept), of its MLP output the clean one plus
    the MLP's difference. Zero ablation so sets each node to alpha times its clean output, as the
    `eap` package interpolates a node towards zero; mean or optimal ablation towards their values.
  """
  L, H = cfg.n_layers, cfg.n_heads
  b, p, _, d = diff.shape
  per_layer = jnp.moveaxis(diff[:, :, 1:].reshape(b, p, L, H + 1, d), 2, 0)  # [L, b, p, H+1, d]
  delta = {"hook_attn_out": per_layer[:, :, :, :H].sum(3), "hook_mlp_out": per_layer[:, :, :, H]}
  clean = {k: clean[k] for k in ABLATED_OUTPUTS}
  return clean, {k: clean[k].astype(jnp.float32) + delta[k] for k in ABLATED_OUTPUTS}


def _patching_diff(cfg: ModelConfig, params, stacked, e_clean: Array, e_corrupt: Array,
                   mask: Array, sfx: shared_prefix.Suffix | None = None):
  """Corrupted minus clean sender outputs, Float[Array, "batch pos sender d_model"] (float32),
  the clean residual stream after the last block, and (with a suffix `sfx`) the clean run's keys
  and values before it (`T.KVPrefix`, else None).

  Clean and corrupted rows run as one scanned forward that keeps only `hook_z` and `hook_mlp_out`;
  a head's output is linear in its z (`z_h W_O[h]`), so the heads' differences are projected once,
  from the z differences, instead of both runs' per-head results. (Not for post-norm models, whose
  head outputs are rescaled per run.) With a suffix `sfx`, the corrupted rows run only their suffix,
  after the clean run's prefix, and the differences are the suffix's: [batch, width, sender, d].
  """
  names = LAYER_OUTPUTS
  if sfx is None:
    final, clean, corrupt = _run_pair(cfg, params, stacked, e_clean, e_corrupt, mask)
    prefix = None
  else:  # the clean batch, then the corrupted suffixes after its prefix
    final, ys, corrupt, prefix = shared_prefix.run_pair(cfg, params, e_clean, e_corrupt, mask, sfx,
                                                        names, names, stacked)
    clean = {k: sfx.take(ys[k], axis=2) for k in names}
    e_clean, e_corrupt = sfx.take(e_clean), sfx.take(e_corrupt)
  return _pair_diff(cfg, params, e_clean, e_corrupt, clean, corrupt), final, prefix


def _run_pair(cfg: ModelConfig, params, stacked, e_clean: Array, e_corrupt: Array, mask: Array):
  """Clean and corrupted rows as one forward of the blocks: the clean residual stream after the
  last block, and the clean and the corrupted runs' `LAYER_OUTPUTS` ({site: [n_layers, batch, pos,
  ...]}, two)."""
  b = e_clean.shape[0]
  final, ys = T.run_blocks(cfg, params, jnp.concatenate([e_clean, e_corrupt]),
                           jnp.concatenate([mask, mask]), collect=LAYER_OUTPUTS, stacked=stacked)
  return (final[:b], {k: ys[k][:, :b] for k in LAYER_OUTPUTS},
          {k: ys[k][:, b:] for k in LAYER_OUTPUTS})


def _pair_diff(cfg: ModelConfig, params, e_clean: Array, e_corrupt: Array, clean: dict,
               corrupt: dict) -> Array:
  """Corrupted minus clean sender outputs, Float[Array, "batch pos sender d_model"] (float32), from
  the embeddings and the two runs' `LAYER_OUTPUTS` (the heads' projected from their z
  differences)."""
  L, H = cfg.n_layers, cfg.n_heads
  b, p, d = e_clean.shape
  clean, corrupt = ({k: v.astype(jnp.float32) for k, v in y.items()} for y in (clean, corrupt))
  dz = corrupt["attn.hook_z"] - clean["attn.hook_z"]
  mlp_diff = corrupt["hook_mlp_out"] - clean["hook_mlp_out"]
  heads = jnp.stack([jnp.einsum("bphe,hed->bphd", dz[li], params[f"blocks_{li}"]["attn"]["W_O"],
                                preferred_element_type=jnp.float32)
                     for li in range(L)], 2)  # [b, p, L, H, d]
  per_layer = jnp.concatenate([heads, jnp.moveaxis(mlp_diff, 0, 2)[:, :, :, None]], 3)
  return jnp.concatenate([(e_corrupt - e_clean).astype(jnp.float32)[:, :, None],
                         per_layer.reshape(b, p, L * (H + 1), d)], 2)


@functools.partial(compile_policy.jit,
                   static_argnames=("cfg", "task", "remat", "suffix", "row_chunks", "chunk_bytes",
                                    "data_shards", "interpolate"))
def ig_inputs_batch(cfg: ModelConfig, task, params, batch: Batch, ablation, alphas: Array,
                    remat: bool = False, suffix: int | None = None, row_chunks: int = 1,
                    chunk_bytes: float = C.CHUNK_BYTES, data_shards: int = 1,
                    interpolate: str = "inputs"):
  """EAP / EAP-IG-inputs / clean-corrupted (and EAP-IG-activations) scores of one batch.

  Same contract as the weight-gradient reference `eap.weight_gradient_batch(cfg, task, params,
  batch, ablation, alphas, remat)`: returns (Float[Array, "sender receiver"] sum over the batch's
  valid rows of the scores, Float[Array, "batch"] metric values at the last alpha), plus the clean
  metric values Float[Array, "batch"]. With `alphas = [1.0]` this is EAP (the gradient at the clean
  input), with `[0.0, 1.0]` clean-corrupted. `ablation` (an `ablation.Ablation`) gives the
  ablated sender values.

  Each IG step is one plain (fused-head) forward and backward; the blocks run as one `lax.scan`
  (compiled once) when `scan_blocks_fits`, else layer by layer. The receiver gradient of head h's q
  input is `J^T (W_Q[h] dq_h)`, with dq_h the gradient at `attn.hook_q` and J the Jacobian of ln1
  at the layer input x. For LayerNorm,
  `J^T u = (1/sigma) (gamma u - mean(gamma u) - x_hat mean(gamma u x_hat))` (RMSNorm: without the
  mean term), so with D_s the sender difference and P = dq_h / sigma,

      D_s . J^T W dq = D_s . (gamma W P) - sum(D_s) mean(gamma W P)
                       - (D_s . x_hat) (P . (gamma x_hat W)) / d

  and `gamma x_hat W = q - b_Q - beta W`. The first two terms are linear in P with step-independent
  factors, so P is summed over the steps ([batch, pos, 3H, d_head], d_model/d_head times smaller
  than the receiver gradients) and expanded once per batch; the third is contracted per step through
  [batch, pos, sender] and [batch, pos, receiver] factors. No [batch, pos, receiver, d_model] array
  is formed per step. GQA models are ungrouped first (`models.transformer.ungroup_kv`).

  `suffix` (`shared_prefix.plan`, patching only): after the whole clean run, the steps run only
  each row's positions from its first clean/corrupted difference on, that many of them, attending to
  the clean run's keys and values before it (the scores get nothing from the shared prefix, where
  every sender difference is zero).

  With `remat` the older per-head-input kernel runs instead (same scores).

  `row_chunks` > 1 (`memory_budget.row_chunks`, for `--memory_budget`) runs the kernel on that
  many groups of rows in turn (one `lax.scan`, so their temporaries share buffers) and sums their
  scores, and `chunk_bytes` sets the contraction's position chunks: the peak of temporaries is
  then one group's.
  The defaults (1, CHUNK_BYTES) are the unchunked kernel.

  `data_shards`: the batch's rows are split over that many devices (a mesh's "data" axis,
  `contraction.data_shards_of`); the contraction then chunks each device's rows on their own
  (`contraction.contract_positions`).

  `interpolate="activations"` is EAP-IG-activations (`ig_activations`, the definition its
  `weight_gradient_batch` takes literally): instead of the input embeddings, each step interpolates
  one layer node (the input, each layer's heads, each MLP: `layer_node_steps`) from its corrupted to
  its clean value at alpha, with the rest of the model clean. The heads are interpolated at their
  mixed values `hook_z` (a head's output is linear in its z), from the same clean and corrupted
  forward that gives the patching differences. The scores are as linear in the receiver gradients,
  so everything else is the same; the scores are averaged over the (1 + 2 n_layers) m steps and
  the metric values are the last step's (the last MLP at the last alpha). No `suffix`.
  """
  if interpolate not in INTERPOLATE or (interpolate == "activations" and suffix is not None):
    raise ValueError(f"interpolate={interpolate!r} (one of {INTERPOLATE}; activations: no suffix)")
  if row_chunks == 1:
    return _ig_inputs(cfg, task, params, batch, ablation, alphas, remat, suffix, chunk_bytes,
                      data_shards, interpolate)
  groups = C.group_rows(batch, row_chunks, data_shards)  # each device's rows in every group

  def body(total, group):
    s, values, clean_values = _ig_inputs(cfg, task, params, group, ablation, alphas, remat,
                                         suffix, chunk_bytes, data_shards, interpolate)
    return total + s, (values, clean_values)

  zero = jnp.zeros((E.n_senders(cfg), E.n_receivers(cfg)), jnp.float32)
  total, (values, clean_values) = jax.lax.scan(body, zero, groups)
  return (total, C.ungroup_rows(values, data_shards),
          C.ungroup_rows(clean_values, data_shards))


def _ig_inputs(cfg: ModelConfig, task, params, batch: Batch, ablation, alphas: Array,
               remat: bool, suffix: int | None, chunk_bytes: float, data_shards: int = 1,
               interpolate: str = "inputs"):
  """`ig_inputs_batch`'s kernel on one group of rows (its docstring)."""
  if remat:
    return _split_ig_inputs_batch(cfg, task, params, batch, ablation, alphas, remat, interpolate)
  cfg, params = T.ungroup_kv(cfg, params)
  L, H = cfg.n_layers, cfg.n_heads
  S = E.n_senders(cfg)
  stacked = T.stack_blocks(cfg, params) if scan_blocks_fits(cfg, params) else None
  e_corrupt = T.embed_inputs(cfg, params, batch.corrupted, batch.mask)
  e_clean = T.embed_inputs(cfg, params, batch.clean, batch.mask)
  sfx = None if suffix is None else shared_prefix.Suffix.of(batch, suffix)
  patching = ablation.kind == "patching" and not cfg.post_norms  # its differences from _run_pair
  blends = None
  # EAP-IG-activations under patching: the layer nodes' clean and corrupted values; under another
  # ablation, their clean and ablated values (`ablated_blends`, below)
  to_ablated = interpolate == "activations" and ablation.kind != "patching"
  if interpolate == "activations" and not to_ablated:
    final, clean_y, corrupt_y = _run_pair(cfg, params, stacked, e_clean, e_corrupt, batch.mask)
    blends, prefix = (clean_y, corrupt_y), None
    if patching:
      diff = _pair_diff(cfg, params, e_clean, e_corrupt, *blends)
  elif patching:  # clean and corrupted in one forward
    diff, final, prefix = _patching_diff(cfg, params, stacked, e_clean, e_corrupt, batch.mask, sfx)
  if not patching:
    clean, final, prefix, outs = _senders(cfg, params, stacked, e_clean, batch.mask, sfx,
                                          ABLATED_OUTPUTS if to_ablated else ())
    ablated = ablation.values(cfg, params, batch)
    diff = (ablated - clean).astype(jnp.float32)  # [b, p, S, d]
    diff = diff if sfx is None else sfx.take(diff)
    if to_ablated:
      blends = ablated_blends(cfg, outs, diff)
      e_corrupt = ablated[:, :, 0].astype(e_clean.dtype)  # the input node's ablated value
  x = T.Norm(cfg).apply({"params": params.get("ln_final", {})}, final)
  clean_logits = T.last_token_logits(cfg, params, x, batch.last)
  clean_values = task.metric(clean_logits, batch.replace(last=jnp.zeros_like(batch.last)),
                             clean_logits)
  positions = None
  if sfx is not None:  # from here on, only each row's suffix
    positions = sfx.positions
    e_clean, e_corrupt, batch = sfx.take(e_clean), sfx.take(e_corrupt), sfx.batch(batch)
  (P_sum, mlp_sum, log_sum, t3), values = _ig_steps(
      cfg, task, params, stacked, batch, alphas, e_clean, e_corrupt, diff,
      clean_logits if task.needs_clean_logits else None, positions, prefix, blends)

  totals = C.contract_positions(cfg, params, diff, P_sum, mlp_sum, log_sum, chunk_bytes,
                                data_shards)
  attn = jnp.moveaxis(totals[:, :L * 3 * H].reshape(S, L, 3 * H), 1, 0) - t3  # [L, S, 3H]
  mlp = totals[:, L * 3 * H:L * 3 * H + L].T  # [L, S]
  n_attn = np.array([E.n_upstream_of_attn(cfg, li) for li in range(L)])
  n_mlp = np.array([E.n_upstream_of_mlp(cfg, li) for li in range(L)])
  senders = np.arange(S)
  attn = jnp.where((senders[None, :] < n_attn[:, None])[..., None], attn, 0.0)
  mlp = jnp.where(senders[None, :] < n_mlp[:, None], mlp, 0.0)
  blocks = jnp.concatenate([attn, mlp[..., None]], 2)  # [L, S, 3H + 1]: the receiver layout
  scores = jnp.concatenate([jnp.moveaxis(blocks, 0, 1).reshape(S, L * (3 * H + 1)),
                            totals[:, -1:]], 1)
  return scores / values.shape[0], values[-1], clean_values


def _split_ig_inputs_batch(cfg: ModelConfig, task, params, batch: Batch, ablation, alphas: Array,
                           remat: bool = False, interpolate: str = "inputs"):
  """The per-head-input form of `ig_inputs_batch` (under remat, where sites can't be collected).

  Same contract as `ig_inputs_batch`. Each step differentiates w.r.t. zero perturbations of the
  per-head inputs `blocks.{layer}.hook_{q,k,v}_input` (and residual sites for the MLP and logits
  inputs), sums those receiver gradients over the steps and contracts them with the sender
  differences once per batch.
  """
  ablated = ablation.values(cfg, params, batch)
  L = cfg.n_layers
  to_ablated = interpolate == "activations" and ablation.kind != "patching"
  sites = ABLATED_OUTPUTS if to_ablated else LAYER_OUTPUTS
  outputs = [f"blocks.{li}.{n}" for n in sites for li in range(L)]
  wanted = outputs if interpolate == "activations" else []
  _, c = T.forward(cfg, params, batch.clean, attention_mask=batch.mask,
                   edges=E.EdgePatch(None, None),
                   collect=("hook_senders", "ln_final.hook_normalized", *wanted))
  clean = c["hook_senders"]
  last_logits = T.last_token_logits(cfg, params, c["ln_final.hook_normalized"], batch.last)
  clean_values = task.metric(last_logits, batch.replace(last=jnp.zeros_like(batch.last)),
                             last_logits)
  clean_logits = last_logits if task.needs_clean_logits else None
  e_clean = clean[:, :, 0]
  e_corrupt = T.embed_inputs(cfg, params, batch.corrupted, batch.mask)
  eps0 = _eps_sites(cfg, batch.clean.shape, e_clean.dtype)
  blends = None
  if to_ablated:  # {site within a block: [L, ...]}, clean and ablated (`ablated_blends`)
    blends = ablated_blends(cfg, {n: jnp.stack([c[f"blocks.{li}.{n}"] for li in range(L)])
                                  for n in sites}, (ablated - clean).astype(jnp.float32))
    e_corrupt = ablated[:, :, 0].astype(e_clean.dtype)
  elif interpolate == "activations":  # {site within a block: [L, ...]}, clean and corrupted
    _, r = T.forward(cfg, params, batch.corrupted, attention_mask=batch.mask, collect=wanted)
    blends = tuple({n: jnp.stack([y[f"blocks.{li}.{n}"] for li in range(L)])
                    for n in LAYER_OUTPUTS} for y in (c, r))
  xs, inputs = _step_inputs(cfg, alphas, e_clean, e_corrupt, blends)

  def f(eps, x):
    emb, per_layer = inputs(x)
    params_x = _per_step(params, x)
    iv = {n: Shift(e) for n, e in eps.items()}
    iv.update({f"blocks.{li}.{n}": jax.tree.map(lambda a, li=li: a[li], b)
               for n, b in per_layer.items() for li in range(L)})
    if remat:  # T.forward() refuses collect under remat: use the full logits there
      logits = T.forward(cfg, params_x, batch.clean, attention_mask=batch.mask, input_embeds=emb,
                       interventions=iv, remat=True)
      if clean_logits is not None:
        full_clean = T.forward(cfg, params, batch.clean, attention_mask=batch.mask)  # hoistable
        return metric_sum(task, logits, batch, full_clean)
      return metric_sum(task, logits, batch, None)
    _, cache = T.forward(cfg, params_x, batch.clean, attention_mask=batch.mask, input_embeds=emb,
                       interventions=iv, collect=("ln_final.hook_normalized",))
    # The full logits are dead code (XLA removes them): the metric reads the last position only.
    return metric_at_last(cfg, task, params, batch, cache["ln_final.hook_normalized"],
                           clean_logits)

  def step(total, x):
    g, values = jax.grad(f, has_aux=True)(eps0, x)
    return jax.tree.map(jnp.add, total, g), values

  total, values = jax.lax.scan(step, eps0, xs)
  grads = _receiver_grads(cfg, total)
  scores = contract(cfg, ablated - clean, grads)
  return scores / values.shape[0], values[-1], clean_values
