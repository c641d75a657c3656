"""The decoder entries grouped by layer for the layered backward (`replacement.layered_backward`):
each layer's (layer, position) cells in chunks of `G` entries, padded to one count of chunks per
layer, so that the loop's step at layer l contracts only layer l's gradients with only layer l's
chunks, and a batch whose targets sit at layers <= top never touches the chunks above top.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class LayerChunks:
  """Per layer, the decoder entries in chunks of `G` entries of one (layer, position) cell.

  Attributes:
    pos: Int[Array, "L C"], each chunk's position (padding chunks: 0, with zero vectors).
    vec: Float[Array, "L C G d_model"], the chunks' decoder vectors (zero-padded).
    slot: Int[Array, "E"], each entry's index in the flattened `[L * C * G]` slots.
  """

  pos: Array
  vec: Array
  slot: Array


def layer_chunks(layer: np.ndarray, pos: np.ndarray, vec: Array, n_layers: int, n_pos: int,
                 chunk: int) -> LayerChunks:
  """Group the decoder entries (host `layer`, `pos`; device `vec [E, d_model]`) by layer and
  position, in chunks of `chunk` entries (e.g. `attribution.chunk_size`'s), each layer padded to
  the largest layer's count of chunks."""
  E = len(layer)
  cell = layer.astype(np.int64) * n_pos + pos
  order = np.argsort(cell, kind="stable")
  cells, starts, counts = np.unique(cell[order], return_index=True, return_counts=True)
  n_chunks = -(-counts // chunk)  # per occupied cell
  cell_layer = cells // n_pos
  per_layer = np.bincount(cell_layer, weights=n_chunks, minlength=n_layers).astype(np.int64)
  C = max(int(per_layer.max(initial=0)), 1)
  # each cell's first chunk's index within its layer
  before = np.cumsum(n_chunks) - n_chunks
  layer_first = np.concatenate([[0], np.cumsum(per_layer)[:-1]])
  first = before - layer_first[cell_layer]
  chunk_pos = np.zeros((n_layers, C), np.int64)
  for c_layer, c_pos, f, k in zip(cell_layer, cells % n_pos, first, n_chunks, strict=True):
    chunk_pos[c_layer, f:f + k] = c_pos
  rank = np.arange(E) - np.repeat(starts, counts)  # each sorted entry's index in its cell
  slot = np.empty(E, np.int64)
  slot[order] = (np.repeat(cell_layer * C + first, counts) * chunk) + rank
  slots = jax.device_put(slot.astype(np.int32))  # no compiled program, as jnp.asarray's
  padded = _scatter(vec, slots, (n_layers, C, chunk))
  return LayerChunks(jax.device_put(chunk_pos.astype(np.int32)), padded, slots)


@functools.partial(jax.jit, static_argnums=2)
def _scatter(vec: Array, slot: Array, shape: tuple[int, ...]) -> Array:
  """`vec [E, d]` scattered to the rows `slot` of zeros `[prod(shape), d]`, as `[*shape, d]`."""
  n = int(np.prod(shape))
  return jnp.zeros((n, vec.shape[-1]), vec.dtype).at[slot].set(vec).reshape(*shape, -1)
