"""Task data: `Batch` (one padded, jit-ready batch of prompt pairs), `Task` (a name and its
per-example metric), `Dataset` (tokenised prompt pairs that batch themselves with right padding,
length buckets and filler rows) and `TaskError`, the error every bad task input raises.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class TaskError(ValueError):
  """Bad task input: unknown task, unreadable or malformed CSV, labels outside the vocabulary."""


@flax.struct.dataclass
class Batch:
  """One padded batch of prompt pairs (a pytree; every field is an array with leading axis batch).

  Attributes:
    clean: Int[Array, "batch pos"] clean prompt ids, right padded.
    corrupted: Int[Array, "batch pos"] corrupted prompt ids, aligned with clean by index: a row
      whose corrupted prompt tokenises to another length holds it fitted to the clean length
      (`Dataset.fitted`).
    mask: Bool[Array, "batch pos"] True at the clean prompt's real tokens (clean and corrupted
      share it, as EAP-IG runs the corrupted tokens with the clean attention mask).
    last: Int[Array, "batch"] index of the token whose logits the metric reads: each example's last
      real token, unless the dataset sets `read_at`.
    labels: dict str -> Array, task-specific answer ids, leading axis batch.
    valid: Bool[Array, "batch"] False for filler rows that pad the final batch.
  """

  clean: Array
  corrupted: Array
  mask: Array
  last: Array
  labels: dict
  valid: Array

  def rows(self, index, real=None) -> Batch:
    """Rows `index` (Int[Array, "k"]) as a batch of their own; rows where `real` (Bool[Array, "k"])
    is False are marked invalid (fillers, as `Dataset.batches` pads a final batch)."""
    part = jax.tree.map(lambda a: a[index], self)
    return part if real is None else part.replace(valid=part.valid & jnp.asarray(real))


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: a name and its per-example metric.

  Attributes:
    name: registry name.
    metric_fn: `(logits, batch, clean_logits) -> Float[Array, "batch"]`, in the metric's own units
      (see `higher_is_better`). `clean_logits` is only used by metrics that compare with the clean
      run.
    needs_clean_logits: whether `metric_fn` reads `clean_logits`.
    description: one line for help texts.
    higher_is_better: True when a larger metric means more of the behaviour (logit and probability
      differences); False for losses (KL, JS divergence, cross-entropy), which are 0 or small for
      the clean model. It fixes the sign of an edge's importance (`circuits` score conventions).
  """

  name: str
  metric_fn: Callable
  needs_clean_logits: bool = False
  description: str = ""
  higher_is_better: bool = True

  def metric(self, logits: Array, batch: Batch, clean_logits: Array | None = None) -> Array:
    """Per-example metric `Float[Array, "batch"]` of `logits` (`[batch, pos, vocab]`) on `batch`."""
    if self.needs_clean_logits and clean_logits is None:
      raise TaskError(f"task {self.name!r}'s metric needs clean_logits")
    return self.metric_fn(logits, batch, clean_logits)


@dataclasses.dataclass
class Dataset:
  """Tokenised prompt pairs of one task (host numpy arrays).

  Clean and corrupted prompts are aligned by index and share `lengths` (the clean prompt's): as
  EAP-IG and MIB run them (each side tokenised alone and right padded with the tokenizer's pad
  token, the corrupted tokens run with the clean attention mask, the metric read at the clean
  prompt's last token), a corrupted prompt shorter than its clean one is filled up to the clean
  length with the pad token `fill_id` (those positions are attended), and one longer is cut after
  the clean prompt's last token (causal attention: what comes later never reaches the metric).

  Attributes:
    task: the `Task` whose metric these labels feed.
    clean, corrupted: int32 [N, P] token ids, right padded with `pad_id`, P = the longest example.
    lengths: int32 [N] real lengths, BOS included (the clean prompt's; the corrupted prompt shares
      them, fitted when it tokenises to another length).
    labels: str -> np.ndarray with leading axis N (see the `jaxinterp.tasks` table for each task's
    keys). pad_id: the id used for padding (only ever seen at masked positions).
    bos_id: the BOS id prepended to every prompt, or None if none was.
    source: where the data came from (a CSV path or a generator name), for messages and metadata.
    skipped: one line per source row left out as unusable (`load_task(..., skip_bad_rows=True)`).
    skipped_summary: those rows in one line (counts by problem, their lines), empty if none.
    read_at: optional int32 [N], the position whose logits the metric reads (`Batch.last`);
      None reads each example's last real token (`lengths - 1`). Non-causal models (tracr) are
      read at any position this way.
    has_corrupted: False when the data has no corrupted prompts (a CSV without a `corrupted`
      column): `corrupted` then repeats `clean`, and methods that need a corrupted run (patching,
      EAP-IG-inputs) refuse the dataset (`attribution.attribute` says so).
    fitted: how many of the loaded rows have a corrupted prompt of another token length than the
      clean one, fitted to the clean length (see above); 0 for equal lengths.
    fitted_summary: those rows in one line (for the loading summary), empty if none.
    fill_id: the pad token filling the shorter corrupted prompts (the tokenizer's pad token, else
      its EOS, as TransformerLens pads), None when no row needed it.
  """

  task: Task
  clean: np.ndarray
  corrupted: np.ndarray
  lengths: np.ndarray
  labels: dict[str, np.ndarray]
  pad_id: int = 0
  bos_id: int | None = None
  source: str = ""
  skipped: tuple[str, ...] = ()
  skipped_summary: str = ""
  read_at: np.ndarray | None = None
  has_corrupted: bool = True
  fitted: int = 0
  fitted_summary: str = ""
  fill_id: int | None = None

  def __len__(self) -> int:
    return int(self.clean.shape[0])

  @property
  def max_len(self) -> int:
    """The longest example's length (BOS included)."""
    return int(self.lengths.max()) if len(self) else 0

  def batches(self, batch_size: int, bucket: int | None = 8) -> Iterator[Batch]:
    """Yield `Batch`es of exactly `batch_size` rows, in dataset order.

    Args:
      batch_size: rows per batch. The final batch is filled up with copies of its last real row
        marked `valid=False`, so every batch has the same leading size.
      bucket: the position axis of each batch is its longest example rounded up to a multiple of
        `bucket`, so that batch shapes repeat and jitted functions compile only a few times. None
        pads every batch to the dataset's longest example (a single shape).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
      raise TaskError(f"batch_size must be a positive integer, got {batch_size!r}")
    if bucket is not None and (not isinstance(bucket, (int, np.integer)) or bucket <= 0):
      raise TaskError(f"bucket must be a positive integer or None, got {bucket!r}")
    n = len(self)
    for start in range(0, n, batch_size):
      idx = np.arange(start, min(start + batch_size, n))
      n_real = idx.size
      if n_real < batch_size:
        idx = np.concatenate([idx, np.full(batch_size - n_real, idx[-1])])
      if bucket is None:
        width = self.clean.shape[1]
      else:
        width = int(math.ceil(int(self.lengths[idx].max()) / bucket) * bucket)
      yield self._batch(idx, width, n_real)

  def _batch(self, idx: np.ndarray, width: int, n_real: int) -> Batch:
    def fit(a):
      a = a[idx]
      if a.shape[1] >= width:
        return a[:, :width]
      pad = np.full((a.shape[0], width - a.shape[1]), self.pad_id, a.dtype)
      return np.concatenate([a, pad], axis=1)

    lengths = self.lengths[idx]
    mask = np.arange(width)[None, :] < lengths[:, None]
    valid = np.arange(idx.size) < n_real
    return Batch(clean=jnp.asarray(fit(self.clean)), corrupted=jnp.asarray(fit(self.corrupted)),
                 mask=jnp.asarray(mask),
                 last=jnp.asarray(lengths - 1 if self.read_at is None else self.read_at[idx],
                                  jnp.int32),
                 labels={k: jnp.asarray(v[idx]) for k, v in self.labels.items()},
                 valid=jnp.asarray(valid))

  def subset(self, n: int) -> Dataset:
    """The first `n` examples (all of them if `n >= len(self)`), trimmed to their own longest
    length."""
    if not isinstance(n, (int, np.integer)) or n <= 0:
      raise TaskError(f"subset size must be a positive integer, got {n!r}")
    n = min(int(n), len(self))
    width = int(self.lengths[:n].max())
    return dataclasses.replace(self, clean=self.clean[:n, :width],
                               corrupted=self.corrupted[:n, :width], lengths=self.lengths[:n],
                               labels={k: v[:n] for k, v in self.labels.items()},
                               read_at=None if self.read_at is None else self.read_at[:n])
