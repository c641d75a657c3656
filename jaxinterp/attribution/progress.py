"""The running state of an attribution, as a clu-style accumulator, and its orbax checkpoints.

`Progress` holds the sums an attribution accumulates over batches. Like `clu.metrics.Metric` it is
built `empty`, combined with `merge` (two partial states: batches run one after the other, or two
shards of a dataset attributed separately) and turned into its result by `compute`. The driver
(`attribution.attribute`) merges one `Progress.of_batch` per batch, so resuming from a checkpoint is
merging the rest of the batches into the saved state.

`Checkpointer` saves a `Progress` under a run's `.resume` directory after every batch and restores
it, refusing a checkpoint whose fingerprint (the settings of the run that wrote it) differs.

In a multi-process run (`runtime.distributed`) each process scores its own batches and
`merge_processes` merges the processes' partial states in process order after every round; process
0 alone saves checkpoints and reads them back for every process, so a run resumes on any number
of processes (a checkpoint counts batches, whoever scored them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from jaxinterp.attribution import base
from jaxinterp.runtime import distributed, files

FINGERPRINT = "fingerprint.json"


@dataclasses.dataclass(frozen=True)
class Progress:
  """Running sums of an attribution, for checkpointing, resuming and combining partial runs.

  Attributes:
    next_batch: batches merged so far (in a sequential run: the index of the next batch).
    score_sum: float64 array of the scores' shape (e.g. [n_senders, n_receivers]): the sum over the
      processed examples of the scores; None before any batch.
    clean_sum: sum over the processed examples of the clean metric.
    seen: examples processed so far.
    batch_sums, batch_counts: with a bootstrap, every processed batch's score sum (float64) and
      number of real examples, in order (None otherwise).
  """

  next_batch: int = 0
  score_sum: np.ndarray | None = None
  clean_sum: float = 0.0
  seen: int = 0
  batch_sums: tuple | None = None
  batch_counts: tuple | None = None

  @classmethod
  def empty(cls, shape: tuple[int, ...], keep_batches: bool = False) -> Progress:
    """No batch processed yet (`keep_batches`: keep every batch's sums, for a bootstrap)."""
    kept = () if keep_batches else None
    return cls(0, np.zeros(shape, np.float64), 0.0, 0, kept, kept)

  @classmethod
  def of_batch(cls, scores: np.ndarray, clean_total: float, n_real: int,
               keep_batches: bool = False) -> Progress:
    """One batch's state: its summed scores (float64), clean-metric total and real examples."""
    return cls(1, scores, clean_total, n_real, (scores,) if keep_batches else None,
               (n_real,) if keep_batches else None)

  def merge(self, other: Progress) -> Progress:
    """The state of both runs together: sums and counts added, batch sums concatenated (self's
    first; kept only if both kept them)."""
    keep = self.batch_sums is not None and other.batch_sums is not None
    total = other.score_sum if self.score_sum is None else (
        self.score_sum if other.score_sum is None else self.score_sum + other.score_sum)
    return Progress(self.next_batch + other.next_batch, total, self.clean_sum + other.clean_sum,
                    self.seen + other.seen, self.batch_sums + other.batch_sums if keep else None,
                    self.batch_counts + other.batch_counts if keep else None)

  def compute(self) -> tuple[np.ndarray, float]:
    """(mean scores over the examples seen, float64 of the scores' shape; mean clean metric)."""
    return self.score_sum / self.seen, self.clean_sum / max(self.seen, 1)

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The state as a flat dict of numpy arrays (what checkpoints and collectives carry)."""
    tree = {"next_batch": np.int64(self.next_batch), "clean_sum": np.float64(self.clean_sum),
            "seen": np.int64(self.seen)}
    if self.score_sum is not None:
      tree["score_sum"] = np.asarray(self.score_sum)
    if self.batch_sums is not None:
      tree["batch_counts"] = np.asarray(self.batch_counts, np.int64)
      if self.batch_sums:
        tree["batch_sums"] = np.stack(self.batch_sums)
    return tree

  @classmethod
  def from_arrays(cls, tree: dict) -> Progress:
    """The state `to_arrays` (or a checkpoint) holds."""
    sums, counts = None, None
    if "batch_counts" in tree:
      counts = tuple(int(c) for c in np.asarray(tree["batch_counts"]))
      sums = tuple(np.asarray(tree["batch_sums"])) if counts else ()
    score = tree.get("score_sum")
    return cls(next_batch=int(tree["next_batch"]),
               score_sum=None if score is None else np.asarray(score),
               clean_sum=float(tree["clean_sum"]), seen=int(tree["seen"]), batch_sums=sums,
               batch_counts=counts)


def merge_processes(state: Progress, part: Progress | None) -> Progress:
  """`state` merged with every process's `part` of one round, in process order (process p holds
  the round's p-th batch, or None past the last batch); the same result on every process, and with
  one process `state.merge(part)`. A collective: every process calls it."""
  mine = b"" if part is None else distributed.arrays_to_bytes(part.to_arrays())
  for data in distributed.allgather_bytes(mine):
    if data:
      state = state.merge(Progress.from_arrays(distributed.arrays_from_bytes(data)))
  return state


class Checkpointer:
  """A `Progress` saved with orbax under `directory` (e.g. a run's `--out/.resume`).

  Each save goes to a new step directory (orbax finalises it atomically) and older steps are removed
  only after it succeeded, so a kill at any moment leaves a complete checkpoint. `fingerprint` (a
  JSON-ready dict of the run's settings) is written beside the steps; `load` refuses a checkpoint
  whose fingerprint differs.
  """

  def __init__(self, directory: str, fingerprint: dict):
    self.dir = os.path.abspath(directory)
    self.fp = json.loads(json.dumps(fingerprint))  # as it reads back (tuples become lists)

  def _steps(self) -> list[int]:
    if not os.path.isdir(self.dir):
      return []
    return sorted(int(d[5:]) for d in os.listdir(self.dir)
                  if d.startswith("step_") and d[5:].isdigit())

  def load(self) -> Progress | None:
    """The saved state, or None if there is none (a stale fingerprint alone is removed).

    In a multi-process run process 0 reads it and every process gets it (a collective).
    Raises AttributionError naming every setting that differs from the checkpoint's.
    """
    if distributed.process_count() == 1:
      return self._load()
    error, state = "", None
    if distributed.is_writer():
      try:
        state = self._load()
      except base.AttributionError as e:
        error = str(e)
    tree = {"error": np.asarray(error)}
    if state is not None:
      tree.update(state.to_arrays())
    got = distributed.arrays_from_bytes(
        distributed.broadcast_bytes(distributed.arrays_to_bytes(tree)))
    error = str(got.pop("error"))
    if error:  # process 0's refusal, on every process
      raise base.AttributionError(error)
    return Progress.from_arrays(got) if got else None

  def _load(self) -> Progress | None:
    steps = self._steps()
    if not steps:  # nothing complete to resume (possibly a stale fingerprint): start afresh
      self.clear()
      return None
    with open(os.path.join(self.dir, FINGERPRINT)) as f:
      saved = json.load(f)
    diff = {k: (saved.get(k), v) for k, v in self.fp.items() if saved.get(k) != v}
    if diff:
      lines = ", ".join(f"--{k}: checkpoint has {a!r}, now {b!r}" for k, (a, b) in diff.items())
      raise base.AttributionError(
          f"{self.dir} holds a checkpoint of a different run ({lines}). Rerun with the same flags "
          f"to resume, or delete {self.dir} to start over.")
    tree = files.load_arrays(os.path.join(self.dir, f"step_{steps[-1]:06d}"))
    sums, counts = None, None
    if "batch_sums" in tree:  # a bootstrap run keeps every batch's sums
      sums = tuple(np.asarray(tree["batch_sums"]))
      counts = tuple(int(c) for c in np.asarray(tree["batch_counts"]))
    return Progress(next_batch=int(tree["next_batch"]), score_sum=np.asarray(tree["score_sum"]),
                    clean_sum=float(tree["clean_sum"]), seen=int(tree["seen"]),
                    batch_sums=sums, batch_counts=counts)

  def save(self, state: Progress) -> None:
    """Save `state` as the newest step, then remove the older ones (process 0 only)."""
    if not distributed.is_writer():
      return
    os.makedirs(self.dir, exist_ok=True)
    fp_path = os.path.join(self.dir, FINGERPRINT)
    if not os.path.exists(fp_path):
      files.atomic_write_text(fp_path, json.dumps(self.fp, indent=1))
    old = self._steps()
    tree = {"next_batch": np.int64(state.next_batch), "score_sum": state.score_sum,
            "clean_sum": np.float64(state.clean_sum), "seen": np.int64(state.seen)}
    if state.batch_sums:
      tree["batch_sums"] = np.stack(state.batch_sums)
      tree["batch_counts"] = np.asarray(state.batch_counts, np.int64)
    files.save_arrays(os.path.join(self.dir, f"step_{state.next_batch:06d}"), tree)
    for s in old:
      if s != state.next_batch:
        shutil.rmtree(os.path.join(self.dir, f"step_{s:06d}"), ignore_errors=True)

  def clear(self) -> None:
    """Remove the checkpoint (process 0 only)."""
    if not distributed.is_writer():
      return
    shutil.rmtree(self.dir, ignore_errors=True)
