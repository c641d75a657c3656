"""Clean and corrupted prompts share a prefix: run it once, then only each row's suffix.

In a causal model, the positions before the first token where a clean prompt and its corrupted
counterpart differ have the same activations in both runs, and in every run between them (EAP-IG's
interpolated inputs, a circuit's mix of clean and corrupted senders): there every sender's
difference `delta_s = corrupted_s - clean_s` is exactly zero. Two quantities are computed many
times per batch from such differences:

- the EAP / EAP-IG-inputs scores `sum_pos delta_s . dm/dx_r`, one forward and backward per IG step;
- a circuit's metric, one forward per circuit;
- exact patching's metric with one edge (or node) ablated, one rerun per edge.

Neither needs the prefix again after one clean run:
- at prefix positions `delta_s = 0`, so the scores get nothing there;
- every receiver there reads the clean residual, so every node's output there is the clean one;
- the later positions see the prefix only through the keys and values it offers them, which are the
  clean run's (`models.transformer.KVPrefix`).

Positions after the metric's position do not reach it either. So each row runs only from its first
differing token to its metric position. In EAP-IG's IOI data that is about 7 of the batch's 24
positions.

`plan` says whether a batch gains (patching with a corrupted prompt, a causal model, a suffix
narrower than the batch) and how wide the suffix is. `Suffix` then gathers the suffix positions and
builds the prefix's keys and values, and `run_pair` runs the clean batch and the corrupted suffixes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import KVPrefix, run_blocks
from jaxinterp.tasks import Batch

Array = jax.Array

BUCKET = 8  # suffix widths are multiples of this, so that batches share compiled shapes


def _starts(clean, corrupted, last, xp):
  """Each row's first position where clean and corrupted differ, at most its metric position."""
  differs = clean != corrupted
  first = xp.where(differs.any(1), xp.argmax(differs, 1), clean.shape[1])
  return xp.minimum(first, last)


def plan(cfg: ModelConfig, batch: Batch, kind: str) -> int | None:
  """The suffix width for a batch (static: computed on the host), or None to run every position.

  Args:
    cfg: the model; the prefix is shared only if attention is causal.
    batch: a concrete batch (its arrays are read here).
    kind: the ablation's kind; only "patching" ablates with the corrupted run, whose prefix is the
      clean run's.

  Returns:
    The widest row's suffix (first differing token to metric position), rounded up to a multiple of
    `BUCKET`, if that is narrower than the batch; else None.
  """
  if kind != "patching" or not cfg.causal:
    return None
  last = np.asarray(batch.last)
  starts = _starts(np.asarray(batch.clean), np.asarray(batch.corrupted), last, np)
  width = int(math.ceil(int((last - starts).max() + 1) / BUCKET) * BUCKET)
  return width if width < batch.clean.shape[1] else None


@flax.struct.dataclass
class Suffix:
  """Each row's positions from its first differing token on, `width` of them.

  Attributes:
    start: Int[Array, "batch"], the first suffix position of each row (in the batch's positions).
    positions: Int[Array, "batch width"], the position ids of the suffix (start + j).
    mask: Bool[Array, "batch width"], True up to each row's metric position.
  """

  start: Array
  positions: Array
  mask: Array

  @classmethod
  def of(cls, batch: Batch, width: int) -> Suffix:
    """The suffix of every row of `batch` (traceable), `width` from `plan`."""
    start = _starts(batch.clean, batch.corrupted, batch.last, jnp).astype(jnp.int32)
    positions = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
    return cls(start, positions, positions <= batch.last[:, None])

  def take(self, x: Array, axis: int = 1) -> Array:
    """The suffix positions of x, whose `axis` is the batch's position axis and axis 0 or
    `axis - 1` its batch axis: [..., batch, pos, ...] -> [..., batch, width, ...]. Positions past
    the batch's end repeat its last one (they are masked)."""
    idx = jnp.minimum(self.positions, x.shape[axis] - 1)  # [batch, width]
    idx = idx.reshape((1,) * (axis - 1) + idx.shape + (1,) * (x.ndim - axis - 1))
    return jnp.take_along_axis(x, idx, axis=axis)

  def batch(self, batch: Batch) -> Batch:
    """`batch` restricted to the suffix: tokens, mask and metric position in suffix coordinates."""
    return batch.replace(clean=self.take(batch.clean), corrupted=self.take(batch.corrupted),
                         mask=self.mask, last=batch.last - self.start)

  def prefix(self, k: Array, v: Array) -> KVPrefix:
    """The clean run's keys and values before each row's suffix.

    Args:
      k, v: Float[Array, "... batch pos kv_head d_head"], the clean run's `attn.hook_k` /
        `attn.hook_v` over the whole batch (leading axes, e.g. layers, are kept).
    """
    b, p = k.shape[-4], k.shape[-3]
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (b, p))
    mask = positions < self.start[:, None]
    lead = k.shape[:-4]

    def bcast(a):
      return jnp.broadcast_to(a, lead + a.shape)

    return KVPrefix(k, v, bcast(positions), bcast(mask))


KV_SITES = ("attn.hook_k", "attn.hook_v")  # the block sites `Suffix.prefix` is built from


def run_pair(cfg: ModelConfig, params, e_clean: Array, e_corrupt: Array, mask: Array, sfx: Suffix,
             clean_collect: Iterable[str] = (), corrupt_collect: Iterable[str] = (),
             stacked: Mapping | None = None):
  """The clean run of every position, then the corrupted run of each row's suffix only, after the
  clean run's keys and values (`run_blocks`, scanned with `stacked`).

  Args:
    e_clean, e_corrupt: Float[Array, "batch pos d_model"], the input node's outputs of both prompts.
    mask: Bool[Array, "batch pos"], the batch's real tokens.
    clean_collect, corrupt_collect: block sites (e.g. "attn.hook_z") to return from each run.

  Returns:
    (Float[Array, "batch pos d_model"] the clean residual after the last block, the clean sites
    {name: [layer, batch, pos, ...]} (with "attn.hook_k" and "attn.hook_v"), the corrupted sites
    {name: [layer, batch, width, ...]}, the clean prefix's `KVPrefix` with a leading layer axis).
  """
  names = tuple(dict.fromkeys(tuple(clean_collect) + KV_SITES))
  final, clean = run_blocks(cfg, params, e_clean, mask, collect=names, stacked=stacked)
  prefix = sfx.prefix(clean["attn.hook_k"], clean["attn.hook_v"])
  _, corrupt = run_blocks(cfg, params, sfx.take(e_corrupt), sfx.mask, collect=corrupt_collect,
                          stacked=stacked, positions=sfx.positions, prefix=prefix)
  return final, clean, corrupt, prefix
