"""EAP-IG-inputs' per-batch contraction (`receiver_grads.ig_inputs_batch`): the sender differences
with every receiver's summed gradient, in position chunks that stay in cache, each device's rows on
their own when the batch is split over a mesh's "data" axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinterp.models import transformer as T
from jaxinterp.models.config import ModelConfig

# Bytes of one position chunk of `contract_positions`' expanded receiver gradients (in cache).
CHUNK_BYTES = 32e6
Array = jax.Array


def data_shards_of(x) -> int:
  """Devices over whose mesh "data" axis the rows of `x` (an array or ShapeDtypeStruct) are split
  (1 when unsharded or replicated): `ig_inputs_batch`'s `data_shards`."""
  sh = getattr(x, "sharding", None)
  if sh is None or not hasattr(sh, "shard_shape") or not x.shape:
    return 1
  return max(1, x.shape[0] // sh.shard_shape(x.shape)[0])


def group_rows(tree, row_chunks: int, data_shards: int = 1):
  """Every array of `tree` (leading axis batch) as [row_chunks, batch / row_chunks, ...]: the
  groups of rows `--memory_budget`'s kernels score one after another. With `data_shards` > 1 (the
  rows split over a mesh's "data" axis in blocks of batch / data_shards) group g takes rows
  [g k, (g + 1) k) of every shard's block (k = batch / (data_shards row_chunks)), so each device
  scores its own rows in every group and nothing is gathered; `row_chunks` must divide the
  block. With 1 shard, group g is rows [g b / row_chunks, (g + 1) b / row_chunks)."""
  def one(x):
    b = x.shape[0]
    x = x.reshape(data_shards, row_chunks, b // (data_shards * row_chunks), *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(row_chunks, b // row_chunks, *x.shape[3:])
  return jax.tree.map(one, tree)


def ungroup_rows(values: Array, data_shards: int = 1) -> Array:
  """Per-row values [row_chunks, batch / row_chunks] of `group_rows`' groups, in batch order
  ([batch])."""
  r, g = values.shape
  return jnp.swapaxes(values.reshape(r, data_shards, g // data_shards), 0, 1).reshape(-1)


def contract_positions(cfg: ModelConfig, params, diff: Array, P_sum: Array, mlp_sum: Array,
              log_sum: Array, chunk_bytes: float = CHUNK_BYTES, data_shards: int = 1) -> Array:
  """Per-batch contraction of the sender differences with every receiver's summed gradient.

  Args:
    diff: Float[Array, "batch pos sender d_model"], ablated minus clean sender outputs.
    P_sum: Float[Array, "layer batch pos 3H d_head"], head gradients / sigma summed over steps.
    mlp_sum, log_sum: Float[Array, "layer batch pos d_model"] and Float[Array, "batch pos d_model"],
      the MLP-input and logits-input gradients summed over steps.

  Returns:
    Float[Array, "sender layer*3H + layer + 1"]: `D . (A - mean A)` for every (sender, head input)
    pair, with `A = gamma * (W P)` the expanded head gradient (the mean over d_model only for
    LayerNorm: `D . (A - mean A) = D . A - sum(D) mean(A)`), then `D . grad` for every MLP input and
    the logits (all senders; the caller masks those not upstream).

  Positions are processed in chunks small enough that a chunk's expanded gradients
  ([chunk, receivers, d_model]) stay in cache, in one `lax.scan`; the weights are read in place
  (no stacked or rescaled copy), and no [batch, pos, receiver, d_model] array is formed.

  `data_shards` > 1 (the batch split over a mesh's "data" axis): each shard's rows are chunked on
  their own and the scan steps through the shards' chunks side by side ([chunks, shards, size,
  ...]), so that no device gathers the other shards' rows (the flattened chunks of one scan, the
  default, made XLA all-gather the whole batch's `diff` onto every device: docs/performance.md,
  "Memory plans"). 1 is the single-device program, unchanged.
  """
  if data_shards > 1 and diff.shape[0] % data_shards == 0:
    return _contract_shards(cfg, params, diff, P_sum, mlp_sum, log_sum, chunk_bytes, data_shards)
  b, p, S, d = diff.shape
  L, H = cfg.n_layers, cfg.n_heads
  layernorm = cfg.normalization == "layernorm"
  n_pos = b * p
  per_pos = (L * (3 * H + 1) + 1) * d * 4
  size = max(1, min(n_pos, int(chunk_bytes // per_pos)))
  while n_pos % size:
    size -= 1
  chunks = n_pos // size
  Dc = diff.reshape(chunks, size, S, d)
  Pc = jnp.moveaxis(P_sum, 0, 2).reshape(chunks, size, L, 3 * H, P_sum.shape[-1])
  Mc = jnp.concatenate([jnp.moveaxis(mlp_sum, 0, 2), log_sum[:, :, None]], 2)
  Mc = Mc.reshape(chunks, size, L + 1, d)
  gammas = [T.Norm(cfg).apply({"params": params[f"blocks_{li}"].get("ln1", {})},
                             method=T.Norm.gain) for li in range(L)]

  def body(acc, xs):
    Dn, Pn, Mn = xs
    A = []
    for li in range(L):
      attn = params[f"blocks_{li}"]["attn"]
      for i, c in enumerate("QKV"):
        W = attn[f"W_{c}"]  # [H, d, d_head]
        A.append(jnp.einsum("nhe,hde->nhd", Pn[:, li, i * H:(i + 1) * H].astype(W.dtype), W,
                            preferred_element_type=jnp.float32) * gammas[li])
    A = jnp.concatenate(A, 1)  # [size, L*3H, d]
    if layernorm:
      A = A - A.mean(-1, keepdims=True)
    G = jnp.concatenate([A, Mn], 1)
    return acc + jnp.einsum("nsd,nrd->sr", Dn, G), None

  acc = jnp.zeros((S, L * (3 * H + 1) + 1), jnp.float32)
  return jax.lax.scan(body, acc, (Dc, Pc, Mc))[0]


def _contract_shards(cfg: ModelConfig, params, diff: Array, P_sum: Array, mlp_sum: Array,
                     log_sum: Array, chunk_bytes: float, n: int) -> Array:
  """`contract_positions` with the batch's rows in `n` shards (its `data_shards`): each shard's
  rows contracted as `contract_positions` contracts a batch, the shards side by side (vmapped) in
  one scan, their sums added at the end."""
  b = diff.shape[0]

  def split(x, axis=0):  # [.., b, ..] -> [n, .., b / n, ..]
    x = jnp.moveaxis(x, axis, 0)
    return jnp.moveaxis(x.reshape(n, b // n, *x.shape[1:]), 1, axis + 1)

  per_shard = jax.vmap(lambda D, P, M, G: contract_positions(cfg, params, D, P, M, G,
                                                                chunk_bytes))
  return per_shard(split(diff), split(P_sum, 1), split(mlp_sum, 1), split(log_sum)).sum(0)
