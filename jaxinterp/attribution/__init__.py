"""Edge attribution: score every edge of the EAP-IG graph, with one driver for every method.

Scores are in the metric's own units: `score(s->r) ~ mean over examples of m(edge ablated) - m(clean)`.

The methods (one module each; `METHODS` is the registry, `get_method(name)` looks one up):

- `eap`: EAP, EAP-IG-inputs and clean-corrupted, on the receiver-gradient kernel
  (`receiver_grads`);
- `ig_activations`: EAP-IG-activations;
- `exact`: exact activation patching of every edge (or node);
- `ifr`: information flow routes (no ablation, no corrupted prompts);
- `nodes`: the node- and neuron-level kernel of EAP, EAP-IG-inputs and clean-corrupted
  (`level="node"|"neuron"`, `base.LevelOptions`);
- `ensemble`: `A+B` names, the mean of rank-normalised scores (`get_method` builds them);
- `bootstrap`: stability of the scores over resampled batches (`attribute(..., bootstrap=B)`).
- `ugs`, `edge_pruning` (on `masks`): learned edge masks, whole-dataset (`Method.fit`);
- `acdc`: ACDC's greedy edge removal with threshold tau, on the exact machinery (`Method.fit`).
- `optimal`: the learned constants of optimal ablation (`intervention="optimal"`, `ablation`).

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

from jaxinterp.attribution import (ablation, base, bootstrap as bootstrap_, eap, ensemble, exact,
                                   ifr, ig_activations, nodes, receiver_grads)
from jaxinterp.attribution import acdc, edge_pruning, masks, optimal, ugs
from jaxinterp.attribution.ablation import INTERVENTIONS, Ablation, compute_means, make_ablation
from jaxinterp.attribution.base import (LEVELS, AttributionError, BatchScores, FitResult, IGOptions,
                                        LevelOptions, Method, Options, Shift, ig_alphas)
from jaxinterp.attribution.exact import ExactOptions, exact_chunk_size
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.tasks import Batch, Dataset
from jaxinterp.models.config import ModelConfig

__all__ = [
    "METHODS", "INTERVENTIONS", "Ablation", "Attribution", "AttributionError", "BatchScores",
    "FitResult", "ExactOptions", "IGOptions", "Method", "Options", "Progress", "Shift", "attribute",
    "compute_means", "exact_chunk_size", "get_method", "ig_alphas",
    "make_ablation", "node_scores", "ablation", "base", "eap", "exact", "ig_activations", "receiver_grads",
    "LEVELS", "LevelOptions", "bootstrap", "ifr", "nodes", "ensemble",
    "acdc", "edge_pruning", "masks", "optimal", "ugs",
]

# The registry: name -> Method. Adding a method is one line here.
METHODS: dict[str, Method] = {m.name: m for m in (
    eap.EAP,
    eap.EAP_IG_INPUTS,
    ig_activations.EAP_IG_ACTIVATIONS,
    eap.CLEAN_CORRUPTED,
    exact.EXACT,
    ifr.IFR,
    ugs.UGS,
    edge_pruning.EDGE_PRUNING,
    acdc.ACDC,
)}


def get_method(name: str) -> Method:
  """The registered `Method` called `name`, or for `A+B(+...)` the ensemble of registered methods
  (`ensemble.ensemble`); AttributionError listing the known names otherwise."""
  if name in METHODS:
    return METHODS[name]
  if isinstance(name, str) and "+" in name:
    parts = name.split("+")
    unknown = [p for p in parts if p not in METHODS]
    if not unknown:
      return ensemble.ensemble(*(METHODS[p] for p in parts))
    raise AttributionError(f"unknown method(s) {unknown} in ensemble {name!r}; choose from "
                           f"{tuple(METHODS)}, joined by '+'")
  raise AttributionError(f"unknown method {name!r}; choose from {tuple(METHODS)} (or an ensemble "
                         f"of them: 'A+B')")


@dataclasses.dataclass
class Attribution:
  """Edge scores and how they were computed.

  Attributes:
    scores: float32 [n_senders, n_receivers] (or the method's level's shape), in the metric's
      units (0 on invalid edges).
    method, intervention, ig_steps, n_examples: provenance.
    clean_metric: mean metric of the clean model over the examples.
    extras: what a whole-dataset method returns besides scores (learned masks, loss curves), and
      with `bootstrap`: "bootstrap_std" and "bootstrap_sign_fraction" (arrays of the scores'
      shape) and "bootstrap" (resamples, unit, seed).
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
    batch_sums, batch_counts: with a bootstrap, every processed batch's score sum (float64) and
      number of real examples, in order (None otherwise).
  """

  next_batch: int = 0
  score_sum: Optional[np.ndarray] = None
  clean_sum: float = 0.0
  seen: int = 0
  batch_sums: Optional[tuple] = None
  batch_counts: Optional[tuple] = None

  @classmethod
  def empty(cls, shape: tuple[int, int]) -> "Progress":
    """No batch processed yet."""
    return cls(0, np.zeros(shape, np.float64), 0.0, 0)

  def merge(self, batch_index: int, scores: np.ndarray, clean_total: float,
            n_real: int) -> "Progress":
    """The sums after batch `batch_index` (with `n_real` real examples) is added."""
    keep = self.batch_sums is not None
    return Progress(batch_index + 1, self.score_sum + scores, self.clean_sum + clean_total,
                    self.seen + n_real, self.batch_sums + (scores,) if keep else None,
                    self.batch_counts + (n_real,) if keep else None)


def attribute(cfg: ModelConfig, params, dataset: Dataset, *, method: str = "EAP-IG-inputs",
              intervention: str = "patching", ig_steps: int = 5, batch_size: int = 16,
              ig_convention: str = "eap", mean_dataset: Optional[Dataset] = None,
              exact_chunk: Optional[int] = None, remat: bool = False, quiet: bool = False,
              resume: Optional[Progress] = None,
              on_batch: Optional[Callable[[Progress], None]] = None,
              batch_fn: Optional[Callable[[Batch], Batch]] = None,
              options: Optional[Options] = None,
              ablation: Optional[Ablation] = None, level: str = "edge",
              bootstrap: Optional[int] = None, seed: int = 0) -> Attribution:
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
    ablation: a prebuilt `Ablation` of the same `intervention` (e.g. learned optimal-ablation
      values, built once with `make_ablation`), instead of building it here.
    level: "edge", "node" ([n_senders] scores) or "neuron" ([n_senders, d_model]), for methods
      whose options have a `level` (`base.LevelOptions`).
    bootstrap: B >= 2 resamples of the batches (`bootstrap.resample`): the scores' standard
      deviation and sign stability go to `extras`. Batch methods only; `seed` seeds the resampling.

  Returns:
    An `Attribution` with scores `[n_senders, n_receivers]` (or the level's shape) in the metric's
    units (an ensemble's are rank-normalised, an IFR's are proportions).
  """
  m = get_method(method)
  if level not in LEVELS:
    raise AttributionError(f"level must be one of {LEVELS}, got {level!r}")
  has_level = lambda x: "level" in {f.name for f in dataclasses.fields(x.options)}
  if level != "edge" and options is None and not has_level(m):
    raise AttributionError(f"{m.name} scores edges only; level={level!r} works with "
                           f"{[n for n, x in METHODS.items() if has_level(x)]}")
  if bootstrap is not None:
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 2:
      raise AttributionError(f"bootstrap must be an integer >= 2 (the number of resamples), got "
                             f"{bootstrap!r}")
    if m.fit is not None:
      raise AttributionError(f"bootstrap resamples per-batch scores; {m.name} fits the whole "
                             "dataset at once")
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
                             exact_chunk=exact_chunk, remat=remat, level=level,
                             batch_size=batch_size)
  options = dataclasses.replace(options,
                                progress=not quiet and (n_batches == 1 or m.fit is not None))
  if ablation is not None and ablation.kind != intervention:
    raise AttributionError(f"the ablation given is {ablation.kind!r}, not intervention="
                           f"{intervention!r}")
  if not getattr(dataset, "has_corrupted", True) and (
      m.needs_corrupted or (m.ablates and intervention == "patching")):
    why = "it interpolates from them" if m.needs_corrupted else "intervention='patching' ablates to them"
    raise AttributionError(f"{m.name} needs corrupted prompts ({why}), but the dataset "
                           f"{dataset.source or ''} has none; use intervention='zero', 'mean' or "
                           f"'mean-positional' (EAP, exact), or a method that needs none "
                           f"(information-flow-routes)")
  if ablation is None and m.ablates:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size, mean_dataset)
  abl = ablation
  task = dataset.task
  valid = m.valid_mask(cfg, options)
  out_valid = m.output_mask(cfg, options)
  if m.fit is not None:  # whole-dataset methods: one call, no batches to resume
    result = m.fit(cfg, params, dataset, abl, options)
    scores = np.asarray(result.scores, np.float64)
    base.check_finite(scores[out_valid], 0, "a score")
    return Attribution(np.where(out_valid, scores, 0.0).astype(np.float32), method, intervention,
                       getattr(options, "ig_steps", ig_steps), len(dataset),
                       float(result.clean_metric), dict(result.extras))
  state = resume if resume is not None else Progress()
  if state.score_sum is None:
    state = dataclasses.replace(state, score_sum=np.zeros(valid.shape, np.float64))
  if state.score_sum.shape != valid.shape:
    raise AttributionError(f"resumed scores have shape {state.score_sum.shape}, expected "
                           f"{valid.shape}")
  if bootstrap is not None and state.batch_sums is None:
    if state.next_batch:
      raise AttributionError("the run to resume kept no per-batch sums; bootstrap needs them")
    state = dataclasses.replace(state, batch_sums=(), batch_counts=())
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
    base.check_finite(s[valid], i, "a score")
    state = state.merge(i, s, float(out.clean_total), int(np.sum(real)))
    bar.update(1)
    if on_batch is not None:
      on_batch(state)
  bar.close()
  finalize = lambda x: m.finalize(cfg, task, options, x) if m.finalize is not None else x
  scores = np.where(out_valid, finalize(np.where(valid, state.score_sum / len(dataset), 0.0)), 0.0)
  extras = {}
  if bootstrap is not None:
    std, sign = bootstrap_.resample(np.stack(state.batch_sums), np.asarray(state.batch_counts),
                                    bootstrap, seed, finalize)
    extras = {"bootstrap_std": np.where(out_valid, std, 0.0).astype(np.float32),
              "bootstrap_sign_fraction": np.where(out_valid, sign, 0.0).astype(np.float32),
              "bootstrap": {"resamples": bootstrap, "unit": "batch", "batch_size": batch_size,
                            "n_units": len(state.batch_sums), "seed": seed}}
  return Attribution(scores.astype(np.float32), method, intervention,
                     getattr(options, "ig_steps", ig_steps), len(dataset),
                     state.clean_sum / max(state.seen, 1), extras)


def node_scores(cfg: ModelConfig, scores: np.ndarray) -> np.ndarray:
  """First-order node scores: the effect of ablating a sender's output into all its receivers.

  For gradient methods this is exactly the row sum of the (signed) edge scores, since a sender's
  output enters each downstream receiver additively. Returns float32 [n_senders].
  """
  return np.where(valid_edges(cfg), scores, 0.0).sum(1).astype(np.float32)
