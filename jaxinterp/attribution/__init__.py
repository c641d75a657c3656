"""Edge attribution: score every edge of the EAP-IG graph, with one driver for every method.

Scores are in the metric's own units: `score(s->r) ~ mean over examples of m(edge ablated) - m(clean)`.

The methods (one module each; `METHODS` is the registry, `get_method(name)` looks one up):

- `eap`: EAP, EAP-IG-inputs and clean-corrupted, on the receiver-gradient kernel
  (`receiver_grads`);
- `ig_activations`: EAP-IG-activations;
- `exact`: exact activation patching of every edge.

`ablation` says what an ablated edge carries (patching, zero, mean, mean-positional); `base` holds
the `Method` record, options, per-batch result and the helpers below every method. `attribute`
batches the dataset, resumes, shows progress, checks the numbers are finite and averages, once for
every method. Adding a method is one module that ends with `METHOD = base.Method(...)` and one line
in `METHODS` below.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import ablation, base, eap, exact, ig_activations, receiver_grads
from jaxinterp.attribution.ablation import INTERVENTIONS, Ablation, compute_means, make_ablation
from jaxinterp.attribution.base import (AttributionError, BatchScores, FitResult, IGOptions, Method,
                                        Options, Shift, clean_metric, ig_alphas, metric_at_last,
                                        metric_sum, sender_outputs, valid_edges)
from jaxinterp.attribution.exact import ExactOptions, exact_chunk_size
from jaxinterp.tasks import Batch, Dataset
from models.config import ModelConfig

__all__ = [
    "METHODS", "INTERVENTIONS", "Ablation", "Attribution", "AttributionError", "BatchScores",
    "FitResult", "ExactOptions", "IGOptions", "Method", "Options", "Progress", "Shift", "attribute",
    "clean_metric", "compute_means", "exact_chunk_size", "get_method", "ig_alphas",
    "make_ablation", "metric_at_last", "metric_sum", "node_scores", "sender_outputs",
    "valid_edges", "ablation", "base", "eap", "exact", "ig_activations", "receiver_grads",
]

# The registry: name -> Method. Adding a method is one line here.
METHODS: dict[str, Method] = {m.name: m for m in (
    eap.EAP,
    eap.EAP_IG_INPUTS,
    ig_activations.EAP_IG_ACTIVATIONS,
    eap.CLEAN_CORRUPTED,
    exact.EXACT,
)}


def get_method(name: str) -> Method:
  """The registered `Method` called `name`; AttributionError listing the known names otherwise."""
  if name not in METHODS:
    raise AttributionError(f"unknown method {name!r}; choose from {tuple(METHODS)}")
  return METHODS[name]


@dataclasses.dataclass
class Attribution:
  """Edge scores and how they were computed.

  Attributes:
    scores: float32 [n_senders, n_receivers] (or the method's level's shape), in the metric's
      units (0 on invalid edges).
    method, intervention, ig_steps, n_examples: provenance.
    clean_metric: mean metric of the clean model over the examples.
    extras: what a whole-dataset method returns besides scores (learned masks, loss curves).
  """

  scores: np.ndarray
  method: str
  intervention: str
  ig_steps: int
  n_examples: int
  clean_metric: float
  extras: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Progress:
  """Running sums of an attribution, for checkpointing and resuming long runs.

  Attributes:
    next_batch: index of the next batch to process.
    score_sum: float64 [n_senders, n_receivers], the sum over processed examples of the scores.
    clean_sum: sum over processed examples of the clean metric.
    seen: examples processed so far.
  """

  next_batch: int = 0
  score_sum: Optional[np.ndarray] = None
  clean_sum: float = 0.0
  seen: int = 0

  @classmethod
  def empty(cls, shape: tuple[int, int]) -> "Progress":
    """No batch processed yet."""
    return cls(0, np.zeros(shape, np.float64), 0.0, 0)

  def merge(self, batch_index: int, scores: np.ndarray, clean_total: float,
            n_real: int) -> "Progress":
    """The sums after batch `batch_index` (with `n_real` real examples) is added."""
    return Progress(batch_index + 1, self.score_sum + scores, self.clean_sum + clean_total,
                    self.seen + n_real)


def attribute(cfg: ModelConfig, params, dataset: Dataset, *, method: str = "EAP-IG-inputs",
              intervention: str = "patching", ig_steps: int = 5, batch_size: int = 16,
              ig_convention: str = "eap", mean_dataset: Optional[Dataset] = None,
              exact_chunk: Optional[int] = None, remat: bool = False, quiet: bool = False,
              resume: Optional[Progress] = None,
              on_batch: Optional[Callable[[Progress], None]] = None,
              batch_fn: Optional[Callable[[Batch], Batch]] = None,
              options: Optional[Options] = None) -> Attribution:
  """Score every edge of the model's graph on `dataset` (its task's metric).

  Args:
    cfg, params: the model.
    dataset: prompt pairs; the metric is `dataset.task`'s, read at each example's last real token.
    method: a name in METHODS.
    intervention: how ablated senders are valued: "patching" (the corrupted run), "zero", "mean" or
      "mean-positional" (means over `mean_dataset`, default `dataset`). EAP-IG-inputs interpolates
      the inputs from corrupted to clean, so it takes only "patching".
    ig_steps: m, the number of integrated-gradient steps (IG methods).
    batch_size: examples per compiled call (the last batch is padded; padding rows do not count).
    ig_convention: "eap" (k = 0..m-1 for inputs) or "paper" (k = 1..m) (IG methods).
    exact_chunk: edges evaluated per compiled call by `vmap` in the exact method (default: as many
      as fit in about 2 GB of activations, see `exact_chunk_size`).
    remat: rematerialise blocks in the backward pass (less memory).
    resume: a `Progress` from a checkpoint; batches before `resume.next_batch` are skipped and the
      sums continue from it (the result is bitwise what an uninterrupted run gives).
    on_batch: called with the `Progress` after every batch (e.g. to checkpoint it).
    batch_fn: applied to every batch first, e.g. `functools.partial(sharding.shard_batch,
      mesh=mesh)` for data parallelism over a device mesh (with `sharding.shard_params`).
    options: the method's `Options` object, instead of the keywords above.

  Returns:
    An `Attribution` with scores `[n_senders, n_receivers]` in the metric's units.
  """
  m = get_method(method)
  allowed = m.interventions or INTERVENTIONS
  if intervention in INTERVENTIONS and intervention not in allowed:
    raise AttributionError(f"{m.name} supports only intervention={' or '.join(map(repr, allowed))}"
                           f", not {intervention!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise AttributionError(f"batch_size must be a positive integer, got {batch_size!r}")
  if len(dataset) == 0:
    raise AttributionError("the dataset is empty")
  n_batches = math.ceil(len(dataset) / batch_size)
  if options is None:
    options = m.make_options(ig_steps=ig_steps, ig_convention=ig_convention,
                             exact_chunk=exact_chunk, remat=remat)
  options = dataclasses.replace(options, progress=not quiet and n_batches == 1)
  abl = make_ablation(cfg, params, dataset, intervention, batch_size, mean_dataset)
  task = dataset.task
  valid = m.valid_mask(cfg, options)
  if m.fit is not None:  # whole-dataset methods: one call, no batches to resume
    result = m.fit(cfg, params, dataset, abl, options)
    scores = np.asarray(result.scores, np.float64)
    base.check_finite(scores[valid], 0, "a score")
    return Attribution(np.where(valid, scores, 0.0).astype(np.float32), method, intervention,
                       getattr(options, "ig_steps", ig_steps), len(dataset),
                       float(result.clean_metric), dict(result.extras))
  state = resume if resume is not None else Progress()
  if state.score_sum is None:
    state = dataclasses.replace(state, score_sum=np.zeros(valid.shape, np.float64))
  if state.score_sum.shape != valid.shape:
    raise AttributionError(f"resumed scores have shape {state.score_sum.shape}, expected "
                           f"{valid.shape}")
  bar = tqdm(total=n_batches, desc=f"{method} ({intervention})", disable=quiet, unit="batch",
             initial=state.next_batch)
  for i, batch in enumerate(dataset.batches(batch_size)):
    if i < state.next_batch:
      continue
    if batch_fn is not None:
      batch = batch_fn(batch)
    out = m.score_batch(cfg, task, params, batch, abl, options)
    real = np.asarray(batch.valid)
    base.check_finite(np.asarray(out.clean)[real], i, "the clean metric")
    s = np.asarray(out.scores, np.float64)
    base.check_finite(np.asarray(out.metric)[real], i, "the metric")
    base.check_finite(s[valid], i, "an edge score")
    state = state.merge(i, s, float(out.clean_total), int(np.sum(real)))
    bar.update(1)
    if on_batch is not None:
      on_batch(state)
  bar.close()
  scores = np.where(valid, state.score_sum / len(dataset), 0.0).astype(np.float32)
  return Attribution(scores, method, intervention, getattr(options, "ig_steps", ig_steps),
                     len(dataset), state.clean_sum / max(state.seen, 1))


def node_scores(cfg: ModelConfig, scores: np.ndarray) -> np.ndarray:
  """First-order node scores: the effect of ablating a sender's output into all its receivers.

  For gradient methods this is exactly the row sum of the (signed) edge scores, since a sender's
  output enters each downstream receiver additively. Returns float32 [n_senders].
  """
  return np.where(valid_edges(cfg), scores, 0.0).sum(1).astype(np.float32)
