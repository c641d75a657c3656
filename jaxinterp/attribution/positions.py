"""Position-level edge scores (PEAP's position-aware edges) for EAP, EAP-IG (inputs and
activations), clean-corrupted and exact patching.

The edge-level kernels sum every edge over token positions. Here that axis is kept:
`circuits.positions` names the edges (`a0.h3@5->a1.h0<k>@9`) and holds the scores.

**Gradient methods.** Each step (one IG point, `eap`'s alphas; EAP-IG-activations' layer-by-layer
interpolation, `ig_activations`) is one plain forward and backward, with zero `Shift`s whose
gradients are dm/dq at `attn.hook_q`, dm/dz at `attn.hook_z`, the MLP inputs at
`ln2.hook_normalized` and the logits input after the last block. With D_s the sender difference
(ablated - clean) at a position and J the Jacobian of the receiver's norm there, an edge's score is
`(J D_s) W . g`, so the per-position score of a q, MLP or logits edge is that product before the
sum over positions. A k or v input at key j is read by every query i >= j; its gradient splits by
query exactly, since z_i depends on the key at j only through row i of the attention:

    dm/dv_j^(i) = P_ij dz_i,    dm/dk_j^(i) = J_j^T (dS_ij c'_ij scale q^_i)

(`_kv_grads`: P the pattern, dS the gradient at `attn.hook_attn_scores`, whose row i depends on
dz_i alone, q^ and k^ the query and key after qk-norm and rotary with J_j the Jacobian of k_j ->
k^_j, c' the soft-cap's derivative), all read from the model's own `Attention.attend` through its
sites (masks, sliding windows, rotary, qk-norm, soft-caps are the model's). A crossing score is
`sum_b <J_j D_s[b, j], W_c G_c[b, i, j]>` (G the d_head-wide k or v gradient above, J_j the block
norm's Jacobian at key j). J_j changes with the step but D does not, and (as in
`receiver_grads.ig_inputs_batch`) `J D = gamma (1/sigma) (D_c - x_hat (x_hat . D) / d)` (D_c: D
centred for LayerNorm): the D_c part is linear in `A = G / sigma_j`, which is summed over the steps
and contracted once per batch (`_contract_crossing`: through `Y = (gamma D_c) W_c`, or directly
at d_model, whichever takes fewer multiply-adds, `route`); the x_hat part is one scalar per row,
key and sender, contracted per step. Summed over i and j this is the edge-level score (up to
float rounding): the identity the tests check.

Memory: the scores are `local` [pos, S, R] and `crossing` [pos (pos + 1) / 2, S, 2 L H] (float32;
GPT-2 small at 24 positions: 15 MB and 54 MB). The step-summed A of every layer is carried
through the steps: 2 L x batch x pos (pos + 1) / 2 x H x d_head floats (4 layers x 8 heads x
d_model 256, 16 rows x 21 tokens: 30 MB). Per step and layer the work arrays are the pattern and
dS [batch, H, pos, pos] and the k/v gradients [2, batch, pos, pos, H, d_head]; once per batch and
layer Y [batch, pos, S, 2H, d_head]. Compute: the edge-level step plus, once per batch, batch x
pos x S x 2H x d_head x d_model multiply-adds per layer (Y); benchmarks/positions.py measures it.

**Exact patching** reruns the model per position edge: `positions_exact`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import base, exact, ig_activations, positions_exact, receiver_grads
from jaxinterp.attribution import eap as eap_methods
from jaxinterp.attribution.ablation import POSITION_INTERVENTIONS, Ablation, make_ablation
from jaxinterp.circuits import positions as cpos
from jaxinterp.models import edges as E
from jaxinterp.models import transformer as T
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.sites import Sites
from jaxinterp.runtime import compile_policy
from jaxinterp.tasks import Batch
from jaxinterp.tasks.metrics import clean_metric, metric_at_last

Array = jax.Array
METHODS = ("EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted", "exact")


def _jvp_norm(cfg, p, x: Array, diff: Array) -> Array:
  """J D: the norm's Jacobian at x [b, pos, d] applied to every sender difference [b, pos, S, d]."""
  def one(t):
    return jax.jvp(lambda y: positions_exact.norm(cfg, p, y), (x,), (t,))[1]
  return jax.vmap(one, in_axes=2, out_axes=2)(diff.astype(x.dtype)).astype(jnp.float32)


def _kv_grads(cfg, params, layer, positions, mask, q, k, v, dz, chunk):
  """The gradients at each head's k and v input at every key, split by the query that reads them.

  Returns Float[Array, "2 batch query key head d_head"]: the k (0) and v (1) gradients. With P
  the pattern, dS the gradient at `attn.hook_attn_scores` (its row i depends on dz_i alone), q^
  and k^ the query and key after qk-norm and rotary (k^_j a function of k_j alone, with Jacobian
  J_j) and c' the soft-cap's derivative (1 without one):

      dm/dv_j^(i) = P_ij dz_i,    dm/dk_j^(i) = J_j^T (dS_ij c'_ij scale q^_i).

  P, dS, q^ and J come from the model's own `Attention.attend` (its sites), so masks, sliding
  windows, rotary and qk-norm are the model's. Where k^ is not k (rotary, qk-norm) the k rows are
  pulled back through k -> k^ `chunk` query rows at a time.
  """
  pre = f"blocks.{layer}.attn."
  hat = "hook_rot_{}" if cfg.positional == "rotary" else (
      "hook_{}_normed" if cfg.qk_norm != "none" else None)
  collect = [pre + "hook_pattern", pre + "hook_attn_scores"] + (
      [pre + hat.format(c) for c in "qk"] if hat else [])
  blk = {"params": params[f"blocks_{layer}"]["attn"]}

  def run(k, eps):
    sites = Sites({pre + "hook_attn_scores": base.Shift(eps)}, collect)
    z = T.Attention(cfg, layer).apply(blk, q, k, v, positions=positions, key_mask=mask.astype(bool),
                                      sites=sites, method=T.Attention.attend)
    return z, sites.cache

  b, p, H, _ = q.shape
  eps0 = jnp.zeros((b, H, p, p), jnp.float32)
  _, vjp_scores, cache = jax.vjp(lambda e: run(k, e), eps0, has_aux=True)
  dS = vjp_scores(dz)[0].astype(jnp.float32)  # [b, H, query, key]
  P = cache[pre + "hook_pattern"].astype(jnp.float32)
  if cfg.attn_logit_softcap:
    capped = cache[pre + "hook_attn_scores"].astype(jnp.float32) / cfg.attn_logit_softcap
    dS = jnp.where(dS != 0, dS * (1 - jnp.square(jnp.where(dS != 0, capped, 0.0))), 0.0)
  scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.d_head)
  q_hat = (cache[pre + hat.format("q")] if hat else q).astype(jnp.float32) * scale
  G_v = jnp.einsum("bhij,bihe->bijhe", P, dz.astype(jnp.float32))
  if not hat:
    return jnp.stack([jnp.einsum("bhij,bihe->bijhe", dS, q_hat), G_v])
  # k^_j = f(k_j): pull each query row's gradient back through f.
  _, vjp_key = jax.vjp(lambda k: run(k, eps0)[1][pre + hat.format("k")], k)
  u = jnp.einsum("bhij,bihe->ibjhe", dS, q_hat).reshape(p // chunk, chunk, b, p, H, -1)
  back = jax.lax.map(jax.vmap(lambda r: vjp_key(r.astype(k.dtype))[0].astype(jnp.float32)), u)
  return jnp.stack([jnp.moveaxis(back.reshape(p, b, p, H, -1), 0, 1), G_v])


def _query_chunk(batch: int, n_pos: int, cfg: ModelConfig, chunk_bytes: float) -> int:
  per_query = 4.0 * batch * n_pos * cfg.n_heads * (n_pos + 2 * cfg.d_head + E.n_senders(cfg)) * 3
  size = max(1, min(n_pos, int(chunk_bytes // per_query)))
  while n_pos % size:
    size -= 1
  return size


def _standardize(cfg, p, x: Array) -> tuple[Array, Array, Array]:
  """(gamma, x_hat, 1/sigma) of the block norm `p` at x [b, pos, d]: gamma x_hat + beta = norm."""
  norm = T.Norm(cfg)
  x_hat, inv = norm.apply({"params": p}, x, method=T.Norm.standardize)
  return norm.apply({"params": p}, method=T.Norm.gain), x_hat.astype(jnp.float32), \
      inv.astype(jnp.float32)


def _has_xhat_term(cfg, p) -> bool:
  """Whether the block norm's Jacobian has the x_hat term (not the identity)."""
  return cfg.normalization != "none" and bool(p)


def _step(cfg, task, params, batch: Batch, diff, clean_logits, emb, iv, chunk):
  """One forward + backward.

  Returns (local [pos, S, R], the crossing scores' x_hat term [pairs, S, 2LH], A: per layer the
  k and v gradients at the pairs scaled by 1/sigma_j, Float[Array, "2 batch pair head d_head"],
  metric values). The crossing score is `sum_b <J_j D_s[b, j], W_c dm/dc_j^(i)>` with J_j the norm's
  Jacobian at key j, `J D = gamma 1/sigma (D_c - x_hat (x_hat . D) / d)` (D_c: D centred for
  LayerNorm): its D_c part is linear in A (`_contract_crossing`, once per batch), its x_hat part
  is contracted here (one scalar per row, key and sender).
  """
  L, H, dh, d = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model
  b, p = batch.clean.shape
  S, R = diff.shape[2], E.n_receivers(cfg)
  dt = emb.dtype
  x_mlp = "hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"
  collect = tuple(dict.fromkeys(("hook_resid_pre", x_mlp, "attn.hook_q", "attn.hook_k",
                                 "attn.hook_v")))
  eps0 = {"attn.hook_q": jnp.zeros((L, b, p, H, dh), dt), "attn.hook_z": jnp.zeros((L, b, p, H,
                                                                                     dh), dt),
          "ln2.hook_normalized": jnp.zeros((L, b, p, cfg.d_model), dt),
          "final": jnp.zeros((b, p, cfg.d_model), dt)}

  def f(eps):
    both = {n: base.Shift(e) for n, e in eps.items() if n != "final"} | dict(iv)
    resid, ys = T.run_blocks(cfg, params, emb, batch.mask, both, collect)
    x = positions_exact.norm(cfg, params.get("ln_final", {}), resid + eps["final"])
    total, values = metric_at_last(cfg, task, params, batch, x, clean_logits)
    return total, (values, ys)

  g, (values, ys) = jax.grad(f, has_aux=True)(eps0)
  positions = T.positions_of(batch.mask.astype(bool))
  qi, kj = cpos.pairs(p)
  local = jnp.zeros((p, S, R), jnp.float32)
  crossing, grads = [], []
  for li in range(L):
    blk = params[f"blocks_{li}"]
    n_attn, n_mlp = E.n_upstream_of_attn(cfg, li), E.n_upstream_of_mlp(cfg, li)
    x_pre = ys["hook_resid_pre"][li]
    JD = _jvp_norm(cfg, blk.get("ln1", {}), x_pre, diff[:, :, :n_attn])
    W = {c: blk["attn"][f"W_{c}"].astype(jnp.float32) for c in "QKV"}
    gq = jnp.einsum("bphe,hde->bphd", g["attn.hook_q"][li].astype(jnp.float32), W["Q"])
    r0 = E.head_receiver(cfg, li, 0, "q")
    local = local.at[:, :n_attn, r0:r0 + H].set(jnp.einsum("bpsd,bphd->psh", JD, gq))
    JD2 = _jvp_norm(cfg, blk.get("ln2", {}), ys[x_mlp][li], diff[:, :, :n_mlp])
    g_mlp = g["ln2.hook_normalized"][li].astype(jnp.float32)
    local = local.at[:, :n_mlp, E.mlp_receiver(cfg, li)].set(jnp.einsum("bpsd,bpd->ps", JD2,
                                                                        g_mlp))
    # Crossing: the k/v gradients of each query row alone.
    q, k, v = (ys[f"attn.hook_{c}"][li] for c in "qkv")
    G = _kv_grads(cfg, params, li, positions, batch.mask, q, k, v, g["attn.hook_z"][li],
                  chunk)  # [2, b, query, key, H, dh]
    gamma, x_hat, inv = _standardize(cfg, blk.get("ln1", {}), x_pre)
    A = G * inv[None, :, None, :, :, None]
    grads.append(A[:, :, qi, kj])  # [2, b, pairs, H, dh]
    cross = jnp.zeros((len(qi), n_attn, 2 * H), jnp.float32)
    if _has_xhat_term(cfg, blk.get("ln1", {})):
      u = jnp.einsum("bjd,chde->cbjhe", gamma * x_hat, jnp.stack([W["K"], W["V"]]))
      r = jnp.einsum("cbjhe,cbijhe->bijch", u, A) / d
      e = jnp.einsum("bjsd,bjd->bjs", diff[:, :, :n_attn], x_hat)
      cross = -jnp.einsum("bjs,bijch->ijsch", e, r).reshape(p, p, n_attn, 2 * H)[qi, kj]
    crossing.append(jnp.pad(cross, ((0, 0), (0, S - n_attn), (0, 0))))
  log = jnp.einsum("bpsd,bpd->ps", diff, g["final"].astype(jnp.float32))
  local = local.at[:, :, E.logits_receiver(cfg)].set(log)
  return local, jnp.concatenate(crossing, 2), tuple(grads), values


def _contract_crossing(cfg, params, diff, grads, chunk, route):
  """The D_c part of every crossing score, [pairs, S, 2LH]: `sum_b <gamma D_c[b, j], W_c A[b, i,
  j]>` per layer, head and kind, with A the step-summed scaled gradients of `_step`; through `Y =
  (gamma D_c) W_c` (batch pos S H d_head d_model + batch pos^2 S H d_head multiply-adds) or
  directly at d_model (batch pos^2 H d_head d_model + batch pos^2 S H d_model, `chunk` query rows
  at a time), whichever is fewer ("auto") or as `route` says."""
  b, p, S, d = diff.shape
  H, dh = cfg.n_heads, cfg.d_head
  qi, kj = cpos.pairs(p)
  slot = np.full((p, p), len(qi))  # [query, key] -> pair (a zero row where key > query)
  slot[qi, kj] = np.arange(len(qi))
  out = []
  for li, packed in enumerate(grads):
    A = jnp.pad(packed, ((0, 0), (0, 0), (0, 1), (0, 0), (0, 0)))[:, :, slot]  # [2, b, i, j, H, dh]
    blk = params[f"blocks_{li}"]
    n_attn = E.n_upstream_of_attn(cfg, li)
    gamma = T.Norm(cfg).apply({"params": blk.get("ln1", {})}, method=T.Norm.gain)
    D = diff[:, :, :n_attn]
    if _has_xhat_term(cfg, blk.get("ln1", {})) and cfg.normalization == "layernorm":
      D = D - jnp.mean(D, -1, keepdims=True)
    D = D * gamma
    W = jnp.stack([blk["attn"][f"W_{c}"].astype(jnp.float32) for c in "KV"])  # [2, H, d, dh]
    y_cost = p * dh * d + p * p * dh
    direct = route == "direct" or (route == "auto" and p * p * (dh * d + n_attn * d)
                                   < n_attn * y_cost)
    if direct:
      def rows(idx, D=D, A=A, W=W):
        back = jnp.einsum("cbijhe,chde->cbijhd", A[:, :, idx], W)
        return jnp.einsum("bjsd,cbijhd->ijsch", D, back)
      cross = jax.lax.map(rows, jnp.arange(p).reshape(-1, chunk)).reshape(p, p, n_attn, 2 * H)
      cross = cross[qi, kj]
    else:  # one matmul per (kind, head, key) over (batch, d_head), its operands laid out for it
      Y = (D.reshape(-1, d) @ jnp.moveaxis(W, 2, 0).reshape(d, 2 * H * dh))
      Y = jnp.transpose(Y.reshape(b, p, n_attn, 2, H, dh), (3, 4, 1, 2, 0, 5))
      A = jnp.transpose(A, (0, 4, 3, 1, 5, 2)).reshape(2, H, p, b * dh, p)
      by_key = jnp.einsum("chjsx,chjxi->chjsi", Y.reshape(2, H, p, n_attn, b * dh), A)
      cross = jnp.transpose(by_key[:, :, kj, :, qi], (0, 3, 1, 2)).reshape(-1, n_attn, 2 * H)
    out.append(jnp.pad(cross, ((0, 0), (0, S - n_attn), (0, 0))))  # [pairs, S, 2H]
  return jnp.concatenate(out, 2)


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "interpolate",
                                                        "chunk", "route"))
def gradient_batch(cfg: ModelConfig, task, params, batch: Batch, ablation: Ablation,
                   alphas: Array, interpolate: str = "inputs", chunk: int | None = None,
                   route: str = "auto"):
  """Position-level scores of one batch for a gradient method, summed over its real rows.

  Args:
    alphas: the IG points (EAP: [1]; clean-corrupted: [0, 1]; a method's `EdgeKernel.alphas_of`).
    interpolate: what the steps interpolate, as `receiver_grads.ig_inputs_batch`: "inputs" (the
      input embeddings, corrupted -> clean: EAP, EAP-IG-inputs, clean-corrupted) or
      "activations" (each layer node in turn: EAP-IG-activations).
    chunk: query rows at a time where k gradients are pulled back through rotary or qk-norm, and
      in the "direct" contraction (a divisor of the batch's positions; None: `_query_chunk` with
      64 MB).
    route: how the step-summed crossing gradients are contracted (`_contract_crossing`):
      "direct" at d_model, "y" through the senders projected to d_head, "auto" whichever takes
      fewer multiply-adds; the scores agree up to float rounding.

  Returns:
    (local Float[Array, "pos sender receiver"], crossing Float[Array, "pair sender kv"], metric
    values Float[Array, "batch"] of the last step), in the metric's units.
  """
  cfg, params = T.ungroup_kv(cfg, params)
  b, p = batch.clean.shape
  chunk = chunk or _query_chunk(b, p, cfg, 64e6)
  e_clean = T.embed_inputs(cfg, params, batch.clean, batch.mask)
  e_corrupt = T.embed_inputs(cfg, params, batch.corrupted, batch.mask)
  to_ablated = interpolate == "activations" and ablation.kind != "patching"
  # the clean run's layer outputs a non-patching EAP-IG-activations blends from, in the same forward
  clean, final, _, outs = receiver_grads._senders(
      cfg, params, None, e_clean, batch.mask,
      outputs=receiver_grads.ABLATED_OUTPUTS if to_ablated else ())
  if ablation.kind == "patching" and not cfg.post_norms:
    diff, _, _ = receiver_grads._patching_diff(cfg, params, None, e_clean, e_corrupt, batch.mask)
  else:
    diff = (ablation.values(cfg, params, batch) - clean).astype(jnp.float32)
  x = positions_exact.norm(cfg, params.get("ln_final", {}), final)
  clean_logits = T.last_token_logits(cfg, params, x, batch.last) if task.needs_clean_logits \
      else None
  step = functools.partial(_step, cfg, task, params, batch, diff, clean_logits, chunk=chunk)

  def add(acc, out):
    return jax.tree.map(jnp.add, acc, out[:3]), out[3]

  if interpolate == "inputs":
    def body(acc, alpha):
      emb = e_corrupt + alpha.astype(e_clean.dtype) * (e_clean - e_corrupt)
      return add(acc, step(emb, {}))
    n = alphas.shape[0]
    xs = alphas
  else:
    if not to_ablated:
      names = ("attn.hook_result", "hook_mlp_out")  # not hook_z: `_step` shifts it
      _, yc = T.run_blocks(cfg, params, e_clean, batch.mask, collect=names)
      _, yr = T.run_blocks(cfg, params, e_corrupt, batch.mask, collect=names)
    else:  # from each layer node's ablated value, as the edge-level kernel
      names = receiver_grads.ABLATED_OUTPUTS
      yc, yr = receiver_grads.ablated_blends(cfg, outs, diff)
      e_corrupt = (e_clean + diff[:, :, 0]).astype(e_clean.dtype)
    L = cfg.n_layers
    G = 1 + 2 * L  # input, then each layer's heads and MLP (`receiver_grads.layer_node_steps`)

    def body(acc, ga):
      s = jax.nn.one_hot(ga[0].astype(jnp.int32), G, dtype=e_clean.dtype)
      alpha = ga[1].astype(e_clean.dtype)
      emb = e_clean + s[0] * (alpha * e_clean + (1 - alpha) * e_corrupt - e_clean)
      al = jnp.full((L,), alpha)
      iv = {n: base.Blend(yc[n], yr[n], s[1 + k::2][:L], al)
            for k, n in enumerate(names)}
      return add(acc, step(emb, iv))
    xs = receiver_grads.layer_node_steps(cfg, alphas)
    n = xs.shape[0]
  S = E.n_senders(cfg)
  zero = (jnp.zeros((p, S, E.n_receivers(cfg)), jnp.float32),
          jnp.zeros((p * (p + 1) // 2, S, 2 * cfg.n_layers * cfg.n_heads), jnp.float32),
          tuple(jnp.zeros((2, b, p * (p + 1) // 2, cfg.n_heads, cfg.d_head), jnp.float32)
                for _ in range(cfg.n_layers)))
  (local, crossing, grads), values = jax.lax.scan(body, zero, xs)
  crossing = crossing + _contract_crossing(cfg, params, diff, grads, chunk, route)
  return local / n, crossing / n, values[-1]


@dataclasses.dataclass
class PositionAttribution:
  """Position-level scores averaged over examples, and how they were computed.

  Attributes:
    scores: a `circuits.positions.PositionScores` in the metric's units (the `metric`
      convention of `attribution.attribute` for a higher-is-better metric).
    method, intervention, options, n_examples, clean_metric: as `attribution.Attribution`.
  """

  scores: cpos.PositionScores
  method: str
  intervention: str
  options: base.Options
  n_examples: int
  clean_metric: float


_METHODS = {"EAP": eap_methods.EAP, "EAP-IG-inputs": eap_methods.EAP_IG_INPUTS,
            "EAP-IG-activations": ig_activations.EAP_IG_ACTIVATIONS,
            "clean-corrupted": eap_methods.CLEAN_CORRUPTED, "exact": exact.EXACT}


def attribute_positions(cfg: ModelConfig, params, dataset, method: str = "EAP-IG-inputs", *,
                        intervention: str = "patching", batch_size: int = 16,
                        ablation: Ablation | None = None, quiet: bool = False,
                        chunk: int | None = None, **option_values) -> PositionAttribution:
  """Score every position-level edge on `dataset` (all rows padded to its longest prompt).

  Args:
    method: one of METHODS. `option_values` are its options (`ig_steps`, `ig_convention`,
      `exact_chunk`); `level` is not one of them.
    intervention, batch_size, ablation, quiet: as `attribution.attribute`.
    chunk: query rows per chunk of the crossing computation (`gradient_batch`; None: by memory).

  Returns:
    A `PositionAttribution`; its scores summed over positions equal
    `attribute(...).scores` for the gradient methods (see the module docstring for exact).
  """
  if method not in _METHODS:
    raise base.AttributionError(f"position-level scores exist for {METHODS}, not {method!r}")
  m = _METHODS[method]
  if "level" in option_values:
    raise base.AttributionError("attribute_positions scores position-level edges; it takes no "
                                "level option")
  options = m.make_options(**option_values)
  allowed = m.interventions or POSITION_INTERVENTIONS
  if intervention not in allowed:
    raise base.AttributionError(f"{m.name} supports only intervention="
                                f"{' or '.join(map(repr, allowed))}, not {intervention!r}")
  if ablation is None:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  task = dataset.task
  kernel = m.compile_batch  # the EAP family's `EdgeKernel`: its alphas and what they interpolate
  alphas = kernel.alphas_of(options) if isinstance(kernel, eap_methods.EdgeKernel) else None
  local = crossing = None
  clean_sum, n = 0.0, 0
  batches = list(dataset.batches(batch_size, bucket=None))
  for batch in tqdm(batches, desc=f"{method} positions", disable=quiet, unit="batch"):
    if alphas is None:
      loc, cr, c_values = positions_exact.exact_batch(cfg, task, params, batch, ablation,
                                      options.exact_chunk, quiet or len(batches) > 1)
    else:
      loc, cr, _ = gradient_batch(cfg, task, params, batch, ablation, alphas,
                                  interpolate=kernel.interpolate, chunk=chunk)
      _, c_values, _ = clean_metric(cfg, task, params, batch)
    real = np.asarray(batch.valid)
    loc, cr = np.asarray(loc, np.float64), np.asarray(cr, np.float64)
    for what, x in (("a position score", loc), ("a crossing score", cr)):
      base.check_finite(x.ravel(), n // batch_size, what)
    local = loc if local is None else local + loc
    crossing = cr if crossing is None else crossing + cr
    clean_sum += float(np.sum(np.asarray(c_values, np.float64)[real]))
    n += int(real.sum())
  valid = cpos.layout_for(cpos.shape_key(cfg)).valid
  local = np.where(valid[None], local / n, 0.0).astype(np.float32)
  scores = cpos.PositionScores(cfg, local, (crossing / n).astype(np.float32),
                               m.score_convention(task))
  return PositionAttribution(scores, method, intervention, options, n, clean_sum / n)


def attribute_position_rows(cfg: ModelConfig, params, dataset, method: str = "EAP-IG-inputs", *,
                            intervention: str = "patching", batch_size: int = 16,
                            ablation: Ablation | None = None, quiet: bool = False,
                            chunk: int | None = None, **option_values
                            ) -> Iterator[cpos.PositionScores]:
  """Position-level scores of each row alone, in dataset order (for per-row span aggregation,
  `circuits.schemas.aggregate`): `attribute_positions` on one row at a time, padded to the
  dataset's longest prompt (one compilation), with one ablation built on the whole dataset
  (`batch_size` is only used for that). Their mean over rows is `attribute_positions(...)`'s
  scores up to float rounding; the cost is one batch-of-one pass per row.

  Yields:
    One `circuits.positions.PositionScores` per row, in the metric's units.
  """
  if ablation is None:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  for r in tqdm(range(len(dataset)), desc=f"{method} positions by row", disable=quiet,
                unit="row"):
    row = dataclasses.replace(
        dataset, clean=dataset.clean[r:r + 1], corrupted=dataset.corrupted[r:r + 1],
        lengths=dataset.lengths[r:r + 1], labels={k: v[r:r + 1] for k, v in dataset.labels.items()},
        read_at=None if dataset.read_at is None else dataset.read_at[r:r + 1])
    yield attribute_positions(cfg, params, row, method, intervention=intervention, batch_size=1,
                              ablation=ablation, quiet=True, chunk=chunk,
                              **option_values).scores
