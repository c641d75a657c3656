"""Attribution graphs: the direct effects between the nodes of a prompt's local replacement model
(`replacement`), equal to circuit-tracer's `attribute` (decoderesearch/circuit-tracer 0.5.0).

Nodes, in circuit-tracer's order (`graph.AttributionGraph`): the selected active features, the
error nodes (layer-major), the token embeddings, the logit targets. A row (the target node) is one
VJP of the linearised replacement run: the cotangent is the target's reading vector at its layer
and position (a feature's encoder vector at its transcoder input; a logit's demeaned unembedding
column at `ln_final`'s output, last position), and the row's entries are the resulting gradients at
the sources dotted with each source's writing vector (a feature's activation times its decoder
vector at each layer it writes, an error vector, a token embedding):

  A[t, s] = <d target_t / d source_site(s), vector_s>

Rows are computed `batch_size` at a time as `jax.vmap` of the VJP, in one compiled function (one
compile per shape; the last batch is padded), and copied to a host array batch by batch (the next
batch is dispatched before the previous one is copied), so the device never holds more than two
batches of rows. The gradients at the sources are contracted with the decoder vectors as matmuls
over (layer, position) cells (`CellChunks`), never as a `[batch, entries, d_model]` gather.
Where the blocks share one structure, a batch's backward runs block by block from its top layer
down (`_rows_layered`, `replacement.layered_backward`: the layers above the batch's targets are
skipped, each layer's gradients contracted with its `layer_chunks.LayerChunks` in the loop); the
rows are computed in layer order for that. With `max_feature_nodes`, features are visited as
circuit-tracer's ranking loop does: the logit rows first, then repeatedly the unvisited features
with the most influence on the logits through the rows computed so far
(`pruning.partial_influences`), `update_interval * batch_size` at a time.

Several processes (`runtime.distributed`, e.g. `--num_processes`) split the batches: process p
computes batches p, p + N, ... of each stream, and after every round of N batches the round's rows
are gathered on every process (`distributed.allgather_arrays`: exact), so that each holds the
adjacency one process computes, bitwise (a row does not depend on the process that computes it).
In the ranking loop process 0 ranks the features and sends its choice to the others.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models.config import ModelConfig
from jaxinterp.runtime import distributed
from jaxinterp.transcoders import loading, pruning, replacement
from jaxinterp.transcoders import targets as targets_lib
from jaxinterp.transcoders.clt import CrossLayerTranscoder
from jaxinterp.transcoders.errors import TranscoderError
from jaxinterp.transcoders.graph import AttributionGraph
from jaxinterp.transcoders.layer_chunks import LayerChunks, layer_chunks
from jaxinterp.transcoders.selection import check_tokens, logit_targets, top_unvisited

Array = jax.Array
Transcoders = replacement.Transcoders


@flax.struct.dataclass
class CellChunks:
  """The decoder entries in chunks of `G` entries of one (layer, position) cell, so that a batch
  of rows contracts with them as `C` matmuls `[B, d] @ [d, G]` instead of a gather of `[B, E, d]`.

  Attributes:
    cell: Int[Array, "C"], each chunk's cell `layer * pos + position`.
    vec: Float[Array, "C G d_model"], the chunks' decoder vectors (zero-padded).
    slot: Int[Array, "E"], each entry's index in the flattened `[C * G]` chunk slots.
    one_per_node: whether entry i is active feature i's only entry (per-layer transcoders; static).
  """

  cell: Array
  vec: Array
  slot: Array
  one_per_node: bool = flax.struct.field(pytree_node=False)


CHUNK_SIZES = (8, 16, 32, 64, 128, 256)


def chunk_size(counts: np.ndarray) -> int:
  """The chunk size `G` of `CHUNK_SIZES` that minimises the padded work `C * (G + 16)` for cells
  of `counts` decoder entries (`C`: the chunks, at least one per cell)."""
  return min(CHUNK_SIZES, key=lambda g: int(np.maximum(-(-counts // g), 1).sum()) * (g + 16))


def cell_chunks(node: np.ndarray, layer: np.ndarray, pos: np.ndarray, vec: Array, n_pos: int,
                n_active: int) -> CellChunks:
  """Group the decoder entries (host `node`, `layer`, `pos`; device `vec [E, d_model]`) by cell,
  in chunks of the size `G` (of `CHUNK_SIZES`) that minimises the padded work `C * (G + 16)`."""
  E = len(node)
  cell = layer.astype(np.int64) * n_pos + pos
  order = np.argsort(cell, kind="stable")
  cells, starts, counts = np.unique(cell[order], return_index=True, return_counts=True)
  if E == 0:
    cells, starts, counts = np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64)
  G = chunk_size(counts)
  n_chunks = np.maximum(-(-counts // G), 1)
  first = np.concatenate([[0], np.cumsum(n_chunks)[:-1]])
  chunk_cell = np.repeat(cells, n_chunks)
  rank = np.arange(E) - np.repeat(starts, counts)  # each sorted entry's index in its cell
  slot = np.empty(E, np.int64)
  slot[order] = np.repeat(first, counts) * G + rank
  C = int(n_chunks.sum())
  padded = _padded(vec, jax.device_put(slot.astype(np.int32)), C, G)
  one = E == n_active and bool(np.array_equal(node, np.arange(E)))
  return CellChunks(jax.device_put(chunk_cell.astype(np.int32)), padded,
                    jax.device_put(slot.astype(np.int32)), one)


@flax.struct.dataclass
class Writers:
  """The sources' writing vectors (device arrays).

  Attributes:
    dec_node, dec_layer, dec_pos: Int[Array, "E"]; dec_vec: Float[Array, "E d_model"]: the
      decoder entries, each an active feature's activation times its decoder vector at one layer it
      writes (one per feature for per-layer transcoders, one per later layer for cross-layer ones),
      `dec_node` indexing the active features.
    errors: Float[Array, "L pos d_model"], the error vectors (zero at BOS).
    embed: Float[Array, "pos d_model"], the token embeddings.
    n_active: the number of active features (static).
    cell_chunks: the decoder entries grouped by their (layer, position) cell (`CellChunks`), for
      `_rows`' matmul contraction; None: `_rows` gathers each entry's gradient instead (more
      memory traffic, same values).
    layer_chunks: the same entries grouped by layer (`layer_chunks.LayerChunks`), for
      `_rows_layered`, which contracts each layer's gradients inside the layered backward; None:
      it contracts them after it, as `_rows` does.
  """

  dec_node: Array
  dec_layer: Array
  dec_pos: Array
  dec_vec: Array
  errors: Array
  embed: Array
  n_active: int = flax.struct.field(pytree_node=False)
  cell_chunks: CellChunks | None = None
  layer_chunks: LayerChunks | None = None


@dataclasses.dataclass(frozen=True)
class Sources:
  """The active features and the sources' vectors of one prompt.

  Attributes:
    active: Int[ndarray, "n_active 3"], (layer, position, feature) of each active feature, sorted.
    values: Float[ndarray, "n_active"], their activations.
    encoders: Float[Array, "n_active d_model"], each feature's encoder vector (its reading vector).
    writers: `Writers`.
  """

  active: np.ndarray
  values: np.ndarray
  encoders: Array
  writers: Writers


@jax.jit
def _features_and_errors(tc: Transcoders, run: replacement.Run) -> tuple[Array, Array]:
  """Activations `[L, pos, F]` and error vectors `[L, pos, d_model]`, BOS zeroed (one program,
  not one compiled kernel per operation)."""
  feats = replacement.active_features(tc, run.inputs)
  return feats, replacement.error_vectors(tc, run, feats)


@jax.jit
def _plt_vectors(tc: Transcoders, li: Array, fi: Array, vals: Array) -> tuple[Array, Array]:
  """Per-layer transcoders' encoder vectors and activation-scaled decoder vectors of the active
  features (layer `li`, feature `fi`): two Float[Array, "n_active d_model"]."""
  return tc.W_enc[li, :, fi], tc.W_dec[li, fi] * vals


@functools.partial(jax.jit, static_argnums=(2, 3))
def _padded(vec: Array, slot: Array, n_chunks: int, chunk: int) -> Array:
  """`vec [E, d]` scattered to the flat slots `slot` of zeros `[n_chunks, chunk, d]`."""
  d = vec.shape[-1]
  return jnp.zeros((n_chunks * chunk, d), vec.dtype).at[slot].set(vec).reshape(n_chunks, chunk, d)


def sources(tc: Transcoders, run: replacement.Run) -> Sources:
  """Active features (BOS zeroed), their vectors, the error vectors and the embeddings."""
  feats, errors = _features_and_errors(tc, run)
  f = np.asarray(feats)
  active = np.argwhere(f > 0).astype(np.int64)  # sorted by (layer, position, feature)
  values = f[tuple(active.T)]
  li, fi = jax.device_put(active[:, 0].copy()), jax.device_put(active[:, 2].copy())
  vals = jax.device_put(np.asarray(values, tc.dtype)[:, None])
  if isinstance(tc, CrossLayerTranscoder):
    encoders = tc.W_enc[li, :, fi]
    nodes, layers, vecs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], []
    for s in range(tc.n_layers):
      idx = np.flatnonzero(active[:, 0] == s)
      w = tc.W_dec[s][jnp.asarray(active[idx, 2])] * vals[idx, None]  # [n, L - s, d]
      nodes.append(np.repeat(idx, tc.n_layers - s))
      layers.append(np.tile(np.arange(s, tc.n_layers), idx.size))
      vecs.append(w.reshape(-1, tc.d_model))
    node, layer = np.concatenate(nodes), np.concatenate(layers)
    vec = jnp.concatenate(vecs)
  else:
    node, layer = np.arange(len(active)), active[:, 0]
    encoders, vec = _plt_vectors(tc, li, fi, vals)
  pos = active[node, 1]
  L, P = errors.shape[:2]
  chunks = cell_chunks(node, layer, pos, vec, P, len(active))
  by_layer = layer_chunks(layer, pos, vec, L, P, chunks.vec.shape[1])
  writers = Writers(*(jax.device_put(np.array(x)) for x in (node, layer, pos)), vec, errors,
                    run.embed, len(active), chunks, by_layer)
  return Sources(active, values, encoders, writers)


@jax.jit
def _rows(vjp, like: replacement.Targets, w: Writers, layers: Array, positions: Array,
          vectors: Array) -> Array:
  """Rows for a batch of targets: Float[Array, "B n_active + (L + 1) * pos"].

  like: the run's targets (for their dtypes). layers: Int[Array, "B"] (L: the logits, read at
  `ln_final`'s output); positions: Int[Array, "B"]; vectors: Float[Array, "B d_model"], each
  target's reading vector.
  """
  L, P, d = w.errors.shape
  B = layers.shape[0]
  cot = jnp.zeros((B, L + 1, P, d), vectors.dtype).at[jnp.arange(B), layers, positions].set(vectors)
  inputs = tuple(cot[:, i].astype(x.dtype) for i, x in enumerate(like.inputs))
  final = cot[:, L].astype(like.final.dtype)
  (src,) = jax.vmap(lambda i, f: vjp(replacement.Targets(i, f)))(inputs, final)
  return _contract(w, jnp.stack(src.outputs, 1), src.embed)


@jax.jit
def _rows_layered(lv: replacement.LayeredVJP, like: replacement.Targets, w: Writers, top: Array,
                  layers: Array, positions: Array, vectors: Array) -> Array:
  """`_rows` through blocks `top`, ..., 0 only (`replacement.layered_backward`; every target at a
  layer <= `top`, the logits needing `top` = L - 1): the same rows."""
  lc = w.layer_chunks
  if lc is None:
    embed, outs = replacement.layered_backward(lv, top, like, layers, positions, vectors)
    return _contract(w, outs, embed)
  L, P, d = w.errors.shape
  B = layers.shape[0]

  def reduce(li, src):  # [B, pos, d_model] at layer li's MLP output -> its chunks', errors' dots
    src = src.astype(jnp.float32)
    x = jnp.take(src, lc.pos[li], axis=1)  # [B, C, d]
    per_slot = jnp.einsum("bcd,cgd->bcg", x, lc.vec[li].astype(jnp.float32)).reshape(B, -1)
    return per_slot, jnp.einsum("bpd,pd->bp", src, w.errors[li].astype(jnp.float32))

  embed, (per_slot, errs) = replacement.layered_backward(lv, top, like, layers, positions,
                                                         vectors, reduce)
  per_entry = jnp.take(per_slot.reshape(B, -1), lc.slot, axis=1)  # [B, E]
  return _finish(w, per_entry, errs.reshape(B, L * P), embed)


def _contract(w: Writers, outs: Array, embed: Array) -> Array:
  """A batch of rows from the gradients at the sources (`outs` Float[Array, "B L pos d_model"] at
  the MLP outputs, `embed` Float[Array, "B pos d_model"] at the embeddings): each decoder entry's,
  error vector's and token embedding's dot product with its gradient."""
  L, P, d = w.errors.shape
  B = outs.shape[0]
  outs = outs.astype(jnp.float32)
  ch = w.cell_chunks
  if ch is None:
    g = outs[:, w.dec_layer, w.dec_pos]  # [B, E, d]
    per_entry = jnp.einsum("bed,ed->be", g, w.dec_vec.astype(jnp.float32))
  else:
    x = jnp.take(outs.reshape(B, L * P, d), ch.cell, axis=1)  # [B, C, d]
    per_slot = jnp.einsum("bcd,cgd->bcg", x, ch.vec.astype(jnp.float32)).reshape(B, -1)
    per_entry = jnp.take(per_slot, ch.slot, axis=1)  # [B, E]
  errs = jnp.einsum("blpd,lpd->blp", outs, w.errors.astype(jnp.float32)).reshape(B, L * P)
  return _finish(w, per_entry, errs, embed)


def _finish(w: Writers, per_entry: Array, errs: Array, embed: Array) -> Array:
  """The rows from each decoder entry's dot product (`per_entry` Float[Array, "B E"]), each error
  node's (`errs` Float[Array, "B L*pos"]) and the gradients at the embeddings (Float[Array, "B pos
  d_model"]): the entries summed per feature, the token embeddings' dot products appended."""
  if w.cell_chunks is not None and w.cell_chunks.one_per_node:
    feats = per_entry
  else:
    feats = jax.ops.segment_sum(per_entry.T, w.dec_node, w.n_active).T
  toks = jnp.einsum("bpd,pd->bp", embed.astype(jnp.float32), w.embed.astype(jnp.float32))
  return jnp.concatenate([feats, errs, toks], 1)


def attribute_graph(cfg: ModelConfig, params: Mapping[str, Any], transcoders: Transcoders,
                    tokens, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                    max_feature_nodes: int | None = None, batch_size: int = 128,
                    targets: targets_lib.LogitTargets | Sequence[int] | None = None,
                    update_interval: int = 4,
                    progress: Callable[[int, int], None] | None = None) -> AttributionGraph:
  """The dense attribution graph of one prompt (circuit-tracer's `attribute`).

  Args:
    cfg, params: the model. transcoders: `PerLayerTranscoders` or `CrossLayerTranscoder` for it.
    tokens: Int[ndarray, "pos"], the prompt with BOS first (position 0 gets no feature or error
      node contributions).
    max_n_logits, desired_logit_prob: the default targets (`targets.salient_logits`).
    max_feature_nodes: keep at most this many features, the most influential (None: all active).
    batch_size: rows per VJP batch. targets: token ids, or `LogitTargets` (e.g. `targets.custom`),
      instead of the salient logits. update_interval: batches between re-rankings.
    progress: called as `progress(rows_done, rows_total)` after each batch (several processes:
      after each round's batches are gathered).

  Returns:
    `AttributionGraph` (host float32 arrays). TranscoderError (one line) for bad input.
  """
  loading.check_model(transcoders, cfg)
  toks = check_tokens(cfg, tokens)
  if batch_size < 1 or update_interval < 1:
    raise TranscoderError("batch_size and update_interval must be at least 1")
  if max_feature_nodes is not None and max_feature_nodes < 0:
    raise TranscoderError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}")
  toks_d = jax.device_put(np.asarray(toks))
  if replacement.has_layered_vjp(cfg):  # the forward alone: the rows run the layered backward
    (like, run), vjp = replacement.replacement_forward(cfg, params, transcoders, toks_d), None
  else:
    like, run, vjp = replacement.linearize(cfg, params, transcoders, toks_d)
  lv = replacement.layered_vjp(cfg, params, transcoders, run)  # None: the whole-run VJP only
  nodes = sources(transcoders, run)
  tg = logit_targets(cfg, params, np.asarray(run.logits, np.float32)[-1], targets, max_n_logits,
                     desired_logit_prob)  # the last row on the host: no compiled slice
  L, P = cfg.n_layers, len(toks)
  n_active = len(nodes.active)
  logit_offset = n_active + (L + 1) * P
  n_logits = len(tg)
  n_feat = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
  n = logit_offset + n_logits
  if n_feat == n_active:  # every feature: each row goes straight to its row of the adjacency
    edge = np.zeros((n, n), np.float32)
    dest = np.concatenate([n - n_logits + np.arange(n_logits), np.arange(n_active)])
  else:  # the rows in the order computed; the adjacency is assembled from them at the end
    edge = np.zeros((n_feat + n_logits, n), np.float32)
    dest = None
  row_node = np.zeros(n_feat + n_logits, np.int64)
  total = n_feat + n_logits
  done = 0
  encoders = np.asarray(nodes.encoders).astype(np.float32)  # [n_active, d_model], host

  def compute(at: np.ndarray, layers: np.ndarray, positions: np.ndarray,
              vectors: np.ndarray) -> None:
    """Rows `edge[at]` (`at[i]`: row i's row of `edge`), `batch_size` per call of `_rows` (the
    last batch padded), the next batch dispatched before the previous one is copied to the host.
    A batch whose targets sit at layers <= l runs the backward through blocks l, ..., 0 only
    (`_rows_layered`, where the blocks share one structure): callers sort the rows by layer.
    Several processes: process p computes batches p, p + N, ... of them, and each round's N
    batches are gathered (`distributed.allgather_arrays`) into every process's `edge`."""
    n_proc, me = distributed.process_count(), distributed.process_index()
    starts = range(0, len(layers), batch_size)

    def dispatch(i: int) -> tuple[np.ndarray, int, Array]:
      k = min(batch_size, len(layers) - i)
      lay, pos = np.zeros(batch_size, np.int32), np.zeros(batch_size, np.int32)
      vec = np.zeros((batch_size, cfg.d_model), np.float32)
      lay[:k], pos[:k], vec[:k] = layers[i:i + k], positions[i:i + k], vectors[i:i + k]
      if lv is None:
        rows = _rows(vjp, like, nodes.writers, lay, pos, vec)  # not awaited
      else:
        top = np.int32(min(int(lay[:k].max()), L - 1))
        rows = _rows_layered(lv, like, nodes.writers, top, lay, pos, vec)
      return at[i:i + k], k, rows

    def gather(r: int, mine: tuple[int, int, Array] | None) -> None:
      """Every process's batch of round `r` (batches r, r + 1, ...), flushed in batch order."""
      sent = None if mine is None else {"rows": np.asarray(mine[2])[:mine[1]]}
      for q, got in enumerate(distributed.allgather_arrays(sent)):
        if got is not None:
          i = starts[r + q]
          flush(at[i:i + len(got["rows"])], len(got["rows"]), got["rows"])

    pending = None
    if n_proc == 1:
      for i in starts:
        rows = dispatch(i)
        if pending is not None:
          flush(*pending)
        pending = rows
      if pending is not None:
        flush(*pending)
      return
    for r in range(0, len(starts), n_proc):  # rounds: batches r .. r + N - 1
      mine = dispatch(starts[r + me]) if r + me < len(starts) else None
      if pending is not None:
        gather(*pending)
      pending = (r, mine)
    if pending is not None:
      gather(*pending)

  def flush(at: np.ndarray, k: int, rows: Array | np.ndarray) -> None:
    nonlocal done
    edge[at, :logit_offset] = np.asarray(rows)[:k]
    done += k
    if progress is not None:
      progress(done, total)

  row_node[:n_logits] = logit_offset + np.arange(n_logits)
  logit_rows = (np.full(n_logits, L), np.full(n_logits, P - 1), np.asarray(tg.vectors))
  st, visited = n_logits, np.zeros(n_active, bool)
  if n_feat == n_active:  # every feature: the logit and feature rows in one stream of batches
    a = nodes.active
    compute(dest, *(np.concatenate([x, y]) for x, y in
                 zip(logit_rows, (a[:, 0], a[:, 1], encoders), strict=True)))
    row_node[st:] = np.arange(n_active)
    visited[:] = True
  else:  # circuit-tracer's ranking loop: the logit rows, then the most influential features
    compute(np.arange(n_logits), *logit_rows)
    n_visited = 0
    while n_visited < n_feat:
      pending = None
      if distributed.is_writer():  # process 0 ranks for all (the same rows everywhere)
        infl = pruning.partial_influences(edge[:st], tg.probabilities, row_node[:st])
        pending = top_unvisited(infl[:n_active], visited,
                                min(update_interval * batch_size, n_feat - n_visited))
      if distributed.process_count() > 1:
        pending = distributed.allgather_arrays(
            None if pending is None else {"pending": pending})[0]["pending"]
      a = nodes.active[pending]
      by_layer = np.argsort(a[:, 0], kind="stable")  # computed by layer, stored in rank order
      compute(st + by_layer, a[by_layer, 0], a[by_layer, 1], encoders[pending[by_layer]])
      row_node[st:st + len(pending)] = pending
      visited[pending] = True
      st += len(pending)
      n_visited += len(pending)
  selected = np.flatnonzero(visited)
  if dest is not None:
    adjacency = edge
  else:
    edge = edge[:, np.concatenate([selected, np.arange(n_active, n)])]
    edge = edge[np.argsort(row_node, kind="stable")]
    n = edge.shape[1]
    adjacency = np.zeros((n, n), np.float32)
    adjacency[:n_feat] = edge[:n_feat]
    adjacency[n - n_logits:] = edge[n_feat:]
  return AttributionGraph(
      adjacency=adjacency, active_features=nodes.active, selected_features=selected,
      activation_values=np.asarray(nodes.values, np.float32), input_tokens=toks.astype(np.int64),
      logit_tokens=np.asarray(tg.token_ids, np.int64),
      logit_probabilities=np.asarray(tg.probabilities, np.float32)).validate()
