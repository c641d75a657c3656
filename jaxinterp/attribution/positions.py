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

    dm/dk_j = sum_i dm/dk_j^(i),  dm/dk_j^(i) = VJP of (k, v) -> z at the cotangent dm/dz masked
                                  to row i (the same for v)

taken through the model's own `Attention.attend` (qk-norm, rotary, softcaps, sliding windows).
The VJP is linear, so it runs vmapped over a chunk of query rows; a crossing score is then
`sum_{b, e} Y[b, j, s, h, e] dm/dk^(i)[b, j, h, e]` with `Y = (J D) W_K` (d_head wide). Summed
over i and j this is the edge-level score (up to float rounding): the identity the tests check.

Memory: the scores are `local` [pos, S, R] and `crossing` [pos (pos + 1) / 2, S, 2 L H] (float32;
GPT-2 small at 24 positions: 15 MB and 54 MB). Per step and layer the work arrays are Y
[batch, pos, S, H, d_head] (as large as the sender differences) and, per chunk of C query rows,
C x batch x H x pos x (pos + 2 d_head) floats for the vmapped attention backward and its k/v
gradients; C is the largest divisor of pos whose chunk fits `chunk_bytes` (default 64 MB). No
[pos, pos, ...] gradient of the whole batch is formed.

**Exact patching** reruns the model per position edge from the receiver's layer (as `exact`): a
non-crossing edge moves the receiver's input at its one position (`exact.edge_chunk` with the
sender difference kept at that position only); a crossing edge (s@j -> h<k>@i) recomputes head h's
attention with the key (or value) at j moved and adds the change of query i's row alone at
`attn.hook_z` (other queries see the clean key). Exact scores are not additive: summed over
positions they equal the edge-level ones only where one position carries the whole difference
(e.g. an `input` edge when clean and corrupted differ in one token, and every logits edge).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import base, exact, ig_activations, receiver_grads
from jaxinterp.attribution import eap as eap_methods
from jaxinterp.attribution.ablation import Ablation, make_ablation
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


def _norm(cfg, p, x):
  return T.Norm(cfg).apply({"params": p}, x)


def _jvp_norm(cfg, p, x: Array, diff: Array) -> Array:
  """J D: the norm's Jacobian at x [b, pos, d] applied to every sender difference [b, pos, S, d]."""
  def one(t):
    return jax.jvp(lambda y: _norm(cfg, p, y), (x,), (t,))[1]
  return jax.vmap(one, in_axes=2, out_axes=2)(diff.astype(x.dtype)).astype(jnp.float32)


def _attend(cfg, params, layer, positions, mask):
  """(q, k, v) -> hook_z of `layer`, the model's own attention (ungrouped heads)."""
  def f(q, k, v):
    return T.Attention(cfg, layer).apply(
        {"params": params[f"blocks_{layer}"]["attn"]}, q, k, v, positions=positions,
        key_mask=mask.astype(bool), sites=Sites(), method=T.Attention.attend)
  return f


def _query_chunk(batch: int, n_pos: int, cfg: ModelConfig, chunk_bytes: float) -> int:
  per_query = 4.0 * batch * cfg.n_heads * n_pos * (n_pos + 2 * cfg.d_head) * 3
  size = max(1, min(n_pos, int(chunk_bytes // per_query)))
  while n_pos % size:
    size -= 1
  return size


def _step(cfg, task, params, batch: Batch, diff, clean_logits, emb, iv, chunk):
  """One forward + backward: (local [pos, S, R], crossing [pairs, S, 2LH], metric values)."""
  L, H, dh = cfg.n_layers, cfg.n_heads, cfg.d_head
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
    x = _norm(cfg, params.get("ln_final", {}), resid + eps["final"])
    total, values = metric_at_last(cfg, task, params, batch, x, clean_logits)
    return total, (values, ys)

  g, (values, ys) = jax.grad(f, has_aux=True)(eps0)
  positions = T.positions_of(batch.mask.astype(bool))
  qi, kj = cpos.pairs(p)
  local = jnp.zeros((p, S, R), jnp.float32)
  crossing = []
  for li in range(L):
    blk = params[f"blocks_{li}"]
    n_attn, n_mlp = E.n_upstream_of_attn(cfg, li), E.n_upstream_of_mlp(cfg, li)
    JD = _jvp_norm(cfg, blk.get("ln1", {}), ys["hook_resid_pre"][li], diff[:, :, :n_attn])
    W = {c: blk["attn"][f"W_{c}"].astype(jnp.float32) for c in "QKV"}
    gq = jnp.einsum("bphe,hde->bphd", g["attn.hook_q"][li].astype(jnp.float32), W["Q"])
    r0 = E.head_receiver(cfg, li, 0, "q")
    local = local.at[:, :n_attn, r0:r0 + H].set(jnp.einsum("bpsd,bphd->psh", JD, gq))
    JD2 = _jvp_norm(cfg, blk.get("ln2", {}), ys[x_mlp][li], diff[:, :, :n_mlp])
    g_mlp = g["ln2.hook_normalized"][li].astype(jnp.float32)
    local = local.at[:, :n_mlp, E.mlp_receiver(cfg, li)].set(jnp.einsum("bpsd,bpd->ps", JD2,
                                                                        g_mlp))
    # Crossing: the k/v gradients of each query row alone, C rows at a time.
    Y = jnp.stack([jnp.einsum("bpsd,hde->bpshe", JD, W[c]) for c in "KV"], 3)  # [b,p,S,2,H,dh]
    q, k, v = (ys[f"attn.hook_{c}"][li] for c in "qkv")
    _, vjp = jax.vjp(lambda k, v, q=q, li=li: _attend(cfg, params, li, positions, batch.mask)(
        q, k, v), k, v)
    dz = g["attn.hook_z"][li]

    def rows(idx, vjp=vjp, dz=dz, Y=Y):
      cot = dz[None] * (jnp.arange(p)[None, :] == idx[:, None]).astype(dz.dtype)[:, None, :,
                                                                                    None, None]
      gk, gv = jax.vmap(vjp)(cot)  # [C, b, p, H, dh] each
      gkv = jnp.stack([gk, gv], 3).astype(jnp.float32)  # [C, b, p, 2, H, dh]
      return jnp.einsum("bjsche,ibjche->ijsch", Y, gkv)  # [C, p, S, 2, H]

    idx = jnp.arange(p).reshape(-1, chunk)
    dense = jax.lax.map(rows, idx).reshape(p, p, n_attn, 2 * H)  # [query, key, S, 2H]
    cross = dense[qi, kj]  # [pairs, n_attn, 2H]: the packed j <= i half
    crossing.append(jnp.pad(cross, ((0, 0), (0, S - n_attn), (0, 0))))
  log = jnp.einsum("bpsd,bpd->ps", diff, g["final"].astype(jnp.float32))
  local = local.at[:, :, E.logits_receiver(cfg)].set(log)
  return local, jnp.concatenate(crossing, 2), values


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "method", "chunk"))
def gradient_batch(cfg: ModelConfig, task, params, batch: Batch, ablation: Ablation,
                   alphas: Array, method: str = "EAP-IG-inputs", chunk: int | None = None):
  """Position-level scores of one batch for a gradient method, summed over its real rows.

  Args:
    method: "EAP", "EAP-IG-inputs" or "clean-corrupted" (the input embeddings interpolated at
      `alphas`), or "EAP-IG-activations" (each layer node in turn, at `alphas`).
    chunk: query rows per vmapped attention backward (a divisor of the batch's positions; None:
      `_query_chunk` with 64 MB).

  Returns:
    (local Float[Array, "pos sender receiver"], crossing Float[Array, "pair sender kv"], metric
    values Float[Array, "batch"] of the last step), in the metric's units.
  """
  cfg, params = T.ungroup_kv(cfg, params)
  b, p = batch.clean.shape
  chunk = chunk or _query_chunk(b, p, cfg, 64e6)
  e_clean = T.embed_inputs(cfg, params, batch.clean, batch.mask)
  e_corrupt = T.embed_inputs(cfg, params, batch.corrupted, batch.mask)
  clean, final, _ = receiver_grads._senders(cfg, params, None, e_clean, batch.mask)
  if ablation.kind == "patching" and not cfg.post_norms:
    diff, _, _ = receiver_grads._patching_diff(cfg, params, None, e_clean, e_corrupt, batch.mask)
  else:
    diff = (ablation.values(cfg, params, batch) - clean).astype(jnp.float32)
  x = _norm(cfg, params.get("ln_final", {}), final)
  clean_logits = T.last_token_logits(cfg, params, x, batch.last) if task.needs_clean_logits \
      else None
  step = functools.partial(_step, cfg, task, params, batch, diff, clean_logits, chunk=chunk)
  if method != "EAP-IG-activations":
    def body(acc, alpha):
      emb = e_corrupt + alpha.astype(e_clean.dtype) * (e_clean - e_corrupt)
      loc, cr, values = step(emb, {})
      return (acc[0] + loc, acc[1] + cr), values
    n = alphas.shape[0]
    xs = alphas
  else:
    names = ("attn.hook_result", "hook_mlp_out")
    _, yc = T.run_blocks(cfg, params, e_clean, batch.mask, collect=names)
    _, yr = T.run_blocks(cfg, params, e_corrupt, batch.mask, collect=names)
    L = cfg.n_layers
    G = 1 + 2 * L  # input, then each layer's heads and MLP (`ig_activations._layer_groups`)

    def body(acc, ga):
      s = jax.nn.one_hot(ga[0].astype(jnp.int32), G, dtype=e_clean.dtype)
      alpha = ga[1].astype(e_clean.dtype)
      emb = e_clean + s[0] * (alpha * e_clean + (1 - alpha) * e_corrupt - e_clean)
      al = jnp.full((L,), alpha)
      iv = {n: ig_activations._Blend(yc[n], yr[n], s[1 + k::2][:L], al)
            for k, n in enumerate(names)}
      loc, cr, values = step(emb, iv)
      return (acc[0] + loc, acc[1] + cr), values
    n = G * alphas.shape[0]
    xs = jnp.stack([jnp.repeat(jnp.arange(G), alphas.shape[0]).astype(alphas.dtype),
                    jnp.tile(alphas, G)], 1)
  S = E.n_senders(cfg)
  zero = (jnp.zeros((p, S, E.n_receivers(cfg)), jnp.float32),
          jnp.zeros((p * (p + 1) // 2, S, 2 * cfg.n_layers * cfg.n_heads), jnp.float32))
  (local, crossing), values = jax.lax.scan(body, zero, xs)
  return local / n, crossing / n, values[-1]


@functools.partial(compile_policy.jit, static_argnames=("cfg", "task", "layer"))
def crossing_chunk(cfg: ModelConfig, task, layer: int, params, batch: Batch, resid: Array,
                   delta: Array, edges: Array, clean_logits: Array | None):
  """Metric sums with one crossing edge ablated at a time, exactly.

  Args:
    resid: Float[Array, "batch pos d_model"], the clean residual stream entering `layer`.
    delta: Float[Array, "batch pos sender d_model"], clean minus ablated sender outputs.
    edges: Int[Array, "chunk 5"], rows (sender, key position j, head, 0 for k / 1 for v, query
      position i).

  Each copy (`vmap`) recomputes head h's attention with its k (or v) input at j moved to
  x_j - delta_s[j] for every query, keeps the change of query i's row of `hook_z` alone, and
  reruns the model from `layer` with that change added at `attn.hook_z`. Returns Float[Array,
  "chunk"].
  """
  cfg, params = T.ungroup_kv(cfg, params)
  blk = params[f"blocks_{layer}"]
  ln1 = blk.get("ln1", {})
  y = _norm(cfg, ln1, resid)
  W = jnp.stack([blk["attn"]["W_K"], blk["attn"]["W_V"]])  # [2, H, d, d_head]
  kv_b = [blk["attn"][f"b_{c}"] if cfg.attn_bias else 0.0 for c in "QKV"]
  q, k, v = (jnp.einsum("bpd,hde->bphe", y, blk["attn"][f"W_{c}"]) + kv_b[i]
             for i, c in enumerate("QKV"))
  attend = _attend(cfg, params, layer, T.positions_of(batch.mask.astype(bool)), batch.mask)
  z0 = attend(q, k, v)
  start = T.LayerStart(layer, resid)

  def one(e):
    s, j, h, kind, i = e[0], e[1], e[2], e[3], e[4]
    x_j = resid[:, j]  # [b, d]
    dn = _norm(cfg, ln1, x_j - delta[:, j, s].astype(x_j.dtype)) - y[:, j]
    change = dn @ W[kind, h]  # [b, d_head]
    k2 = k.at[:, j, h].add(jnp.where(kind == 0, change, 0.0).astype(k.dtype))
    v2 = v.at[:, j, h].add(jnp.where(kind == 1, change, 0.0).astype(v.dtype))
    dz = (attend(q, k2, v2) - z0)[:, i, h]  # query i's row of head h only
    shift = jnp.zeros_like(z0).at[:, i, h].set(dz)
    iv = {f"blocks.{layer}.attn.hook_z": base.Shift(shift)}
    _, cache = T.forward(cfg, params, batch.clean, attention_mask=batch.mask, interventions=iv,
                         start=start, collect=("ln_final.hook_normalized",))
    return metric_at_last(cfg, task, params, batch, cache["ln_final.hook_normalized"],
                          clean_logits)[0]

  return jax.vmap(one)(edges)


def _chunks(n: int, size: int):
  return [np.arange(a, min(a + size, n)) for a in range(0, n, size)]


def exact_batch(cfg: ModelConfig, task, params, batch: Batch, ablation: Ablation,
                chunk: int | None = None, quiet: bool = True):
  """Exact position-level scores of one batch, summed over its real rows: (local
  Float64[pos, sender, receiver], crossing Float64[pair, sender, kv], clean metric values).

  Reruns per position edge (`exact.edge_chunk`, `crossing_chunk`), `chunk` edges per compiled
  call (None: `exact.exact_chunk_size`): n_pos times the non-k/v edges plus n_pos (n_pos + 1) / 2
  times the k/v edges in all.
  """
  c_total, c_values, clean_logits = clean_metric(cfg, task, params, batch)
  c_total = float(c_total)
  if clean_logits is not None:
    clean_logits = jnp.take_along_axis(clean_logits, batch.last[:, None, None], axis=1)
  if not task.needs_clean_logits:
    clean_logits = None
  resids, mlp_inputs, delta, _ = exact.upstream_cache(cfg, params, batch, ablation)
  b, p = batch.clean.shape
  L, H, S = cfg.n_layers, cfg.n_heads, E.n_senders(cfg)
  chunk = chunk or exact.exact_chunk_size(cfg, b, p)
  valid = cpos.layout_for(cpos.shape_key(cfg)).valid
  kv = cpos.kv_receivers(cfg)
  local = np.zeros((p, S, E.n_receivers(cfg)), np.float64)
  s_idx, r_idx = np.nonzero(valid & ~np.isin(np.arange(valid.shape[1]), kv)[None])
  layer_of = np.minimum(r_idx // (3 * H + 1), L)
  qi, kj = cpos.pairs(p)
  work = []
  for li in range(L + 1):
    sel = np.flatnonzero(layer_of == li)
    work += [("local", li, pos, sel[c]) for pos in range(p) for c in _chunks(sel.size, chunk)]
  cross_edges = []  # (sender, j, head, kind, i, layer)
  for li in range(L):
    n_up = E.n_upstream_of_attn(cfg, li)
    s, pair, h, kind = np.meshgrid(np.arange(n_up), np.arange(qi.size), np.arange(H),
                                   np.arange(2), indexing="ij")
    rows = np.stack([s, kj[pair], h, kind, qi[pair]], -1).reshape(-1, 5)
    work += [("cross", li, None, rows[c]) for c in _chunks(len(rows), chunk)]
    cross_edges.append(rows)
  crossing = np.zeros((qi.size, S, 2 * L * H), np.float64)
  pos_ids = jnp.arange(p)[None, :, None, None]
  for kind_, li, pos, sel in tqdm(work, desc="exact positions: chunks", disable=quiet,
                                  leave=False):
    pad = (-len(sel)) % chunk
    if kind_ == "local":
      n_up = E.n_upstream_of_mlp(cfg, li) if li < L else S
      idx = np.concatenate([sel, np.repeat(sel[-1:], pad)])
      d_p = jnp.where(pos_ids == pos, delta[:, :, :n_up], 0.0)
      vals = np.asarray(exact.edge_chunk(
          cfg, task, li, params, batch, resids[li], mlp_inputs[min(li, L - 1)], d_p,
          jnp.asarray(s_idx[idx], jnp.int32), jnp.asarray(r_idx[idx], jnp.int32), clean_logits),
          np.float64)[:len(sel)]
      local[pos, s_idx[sel], r_idx[sel]] = vals - c_total
    else:
      rows = np.concatenate([sel, np.repeat(sel[-1:], pad, 0)])
      vals = np.asarray(crossing_chunk(cfg, task, li, params, batch, resids[li], delta,
                                       jnp.asarray(rows, jnp.int32), clean_logits),
                        np.float64)[:len(sel)]
      s, j, h, kv_kind, i = sel.T
      crossing[cpos.pair_index(i, j), s, li * 2 * H + kv_kind * H + h] = vals - c_total
  return local, crossing, c_values


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
    chunk: query rows per vmapped attention backward (gradient methods; None: by memory).

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
  allowed = m.interventions or ("patching", "zero", "mean", "mean-positional")
  if intervention not in allowed:
    raise base.AttributionError(f"{m.name} supports only intervention="
                                f"{' or '.join(map(repr, allowed))}, not {intervention!r}")
  if ablation is None:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  task = dataset.task
  if method == "exact":
    alphas = None
  elif method == "EAP":
    alphas = np.asarray([1.0], np.float32)
  elif method == "clean-corrupted":
    alphas = np.asarray([0.0, 1.0], np.float32)
  else:
    alphas = options.alphas(eap_start=0 if method == "EAP-IG-inputs" else 1)
  local = crossing = None
  clean_sum, n = 0.0, 0
  batches = list(dataset.batches(batch_size, bucket=None))
  for batch in tqdm(batches, desc=f"{method} positions", disable=quiet, unit="batch"):
    if alphas is None:
      loc, cr, c_values = exact_batch(cfg, task, params, batch, ablation,
                                      options.exact_chunk, quiet or len(batches) > 1)
    else:
      loc, cr, _ = gradient_batch(cfg, task, params, batch, ablation, jnp.asarray(alphas),
                                  method=method, chunk=chunk)
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
