"""Exact patching of position-level edges (`positions.attribute_positions(..., "exact")`).

**Exact patching** reruns the model per position edge from the receiver's layer (as `exact`): a
non-crossing edge moves the receiver's input at its one position (`exact.edge_chunk` with the
sender difference kept at that position only); a crossing edge (s@j -> h<k>@i) recomputes head h's
attention with the key (or value) at j moved and adds the change of query i's row alone at
`attn.hook_z` (other queries see the clean key). Exact scores are not additive: summed over
positions they equal the edge-level ones only where one position carries the whole difference
(e.g. an `input` edge when clean and corrupted differ in one token, and every logits edge).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import base, exact
from jaxinterp.attribution.ablation import Ablation
from jaxinterp.circuits import positions as cpos
from jaxinterp.models import edges as E
from jaxinterp.models import transformer as T
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.sites import Sites
from jaxinterp.runtime import compile_policy
from jaxinterp.tasks import Batch
from jaxinterp.tasks.metrics import clean_metric, metric_at_last

Array = jax.Array


def norm(cfg, p, x):
  """The block norm `p` (params) applied to x."""
  return T.Norm(cfg).apply({"params": p}, x)


def attend(cfg, params, layer, positions, mask):
  """(q, k, v) -> hook_z of `layer`, the model's own attention (ungrouped heads)."""
  def f(q, k, v):
    return T.Attention(cfg, layer).apply(
        {"params": params[f"blocks_{layer}"]["attn"]}, q, k, v, positions=positions,
        key_mask=mask.astype(bool), sites=Sites(), method=T.Attention.attend)
  return f


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
  y = norm(cfg, ln1, resid)
  W = jnp.stack([blk["attn"]["W_K"], blk["attn"]["W_V"]])  # [2, H, d, d_head]
  kv_b = [blk["attn"][f"b_{c}"] if cfg.attn_bias else 0.0 for c in "QKV"]
  q, k, v = (jnp.einsum("bpd,hde->bphe", y, blk["attn"][f"W_{c}"]) + kv_b[i]
             for i, c in enumerate("QKV"))
  att = attend(cfg, params, layer, T.positions_of(batch.mask.astype(bool)), batch.mask)
  z0 = att(q, k, v)
  start = T.LayerStart(layer, resid)

  def one(e):
    s, j, h, kind, i = e[0], e[1], e[2], e[3], e[4]
    x_j = resid[:, j]  # [b, d]
    dn = norm(cfg, ln1, x_j - delta[:, j, s].astype(x_j.dtype)) - y[:, j]
    change = dn @ W[kind, h]  # [b, d_head]
    k2 = k.at[:, j, h].add(jnp.where(kind == 0, change, 0.0).astype(k.dtype))
    v2 = v.at[:, j, h].add(jnp.where(kind == 1, change, 0.0).astype(v.dtype))
    dz = (att(q, k2, v2) - z0)[:, i, h]  # query i's row of head h only
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
