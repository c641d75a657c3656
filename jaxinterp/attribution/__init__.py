"""Edge attribution: score every edge of the EAP-IG graph, with one driver for every method.

Scores are in the metric's own units:
`score(s->r) ~ mean over examples of m(edge ablated) - m(clean)`.

The methods (one module each; `METHODS` is the registry, `get_method(name)` looks one up):

- `eap`: EAP, EAP-IG-inputs and clean-corrupted, on the receiver-gradient kernel
  (`receiver_grads`);
- `ig_activations`: EAP-IG-activations;
- `exact`: exact activation patching of every edge (or node);
- `ifr`: information flow routes (no ablation, no corrupted prompts);
- `nodes`: the node- and neuron-level kernel of EAP, EAP-IG-inputs and clean-corrupted
  (`level="node"|"neuron"`, `base.Options.level`);
- `ensemble`: `A+B` names, the mean of rank-normalised scores (`get_method` builds them);
- `bootstrap`: stability of the scores over resampled batches (`attribute(..., bootstrap=B)`).
- `ugs`, `edge_pruning` (on `masks`): learned edge masks, whole-dataset (`Method.fit`);
- `acdc`: ACDC's greedy edge removal with threshold tau, on the exact machinery (`Method.fit`).
- `optimal`: the learned constants of optimal ablation (`intervention="optimal"`, `ablation`).
- `qk`: attention explained, no method: one head's pre-softmax score split into a (query term x
  key term) table over the EAP-IG senders and bias terms (`qk.explain_attention`).
- `progress`: the driver's running sums (`Progress`: empty / merge / compute) and their orbax
  checkpoints (`Checkpointer`).

`ablation` says what an ablated edge carries (patching, zero, mean, mean-positional); `base` holds
the `Method` record, options, per-batch result and the helpers below every method. `attribute`
batches the dataset, resumes, shows progress, checks the numbers are finite and averages, once for
every method; a method's settings are its options (`Method.make_options`: an option it does not
have is an error, never dropped). Adding a method is one module that ends with
`METHOD = base.Method(...)` and one line in `METHODS` below (a test scans the modules for any
`Method` left out).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from jaxinterp.attribution import (
  ablation,
  acdc,
  base,
  eap,
  edge_pruning,
  ensemble,
  exact,
  ifr,
  ig_activations,
  masks,
  nodes,
  optimal,
  progress,
  qk,
  receiver_grads,
  ugs,
)
from jaxinterp.attribution import bootstrap as bootstrap_
from jaxinterp.attribution.ablation import (
  INTERVENTIONS,
  Ablation,
  Mean,
  MeanPositional,
  Optimal,
  Patching,
  Zero,
  ZeroAll,
  compute_means,
  make_ablation,
)
from jaxinterp.attribution.base import (
  LEVELS,
  AttributionError,
  BatchScores,
  FitResult,
  IGOptions,
  Method,
  Options,
  Shift,
  ig_alphas,
)
from jaxinterp.attribution.exact import ExactOptions, exact_chunk_size
from jaxinterp.attribution.progress import Checkpointer, Progress
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models.config import ModelConfig
from jaxinterp.runtime import distributed, shared_prefix, timing
from jaxinterp.tasks import Batch, Dataset

__all__ = [
    "METHODS", "INTERVENTIONS", "LEVELS", "SHARED_SETTINGS", "Ablation", "Patching", "Zero",
    "ZeroAll", "Mean", "MeanPositional", "Optimal", "Attribution",
    "AttributionError", "BatchScores", "Checkpointer", "ExactOptions", "FitResult", "IGOptions",
    "Method", "Options", "Progress", "Shift", "attribute", "compute_means", "exact_chunk_size",
    "check_level", "get_method", "ig_alphas", "make_ablation", "make_options", "node_scores",
    "ablation", "acdc", "base", "bootstrap", "eap", "edge_pruning", "ensemble", "exact", "ifr",
    "ig_activations", "masks", "nodes", "optimal", "progress", "qk", "receiver_grads", "ugs",
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

# Settings of the run that also fill the options field of the same name, where a method has one and
# it is not given: an ensemble batches its batch members by `batch_size`, mask training is seeded
# by `seed`.
SHARED_SETTINGS = ("batch_size", "seed")


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


def make_options(method: Method, shared: dict | None = None, **given) -> Options:
  """`method.make_options(**given)` (an unknown keyword is an AttributionError), with the
  `SHARED_SETTINGS` in `shared` filling the fields of that name that `given` leaves out; refuses a
  level the method does not score."""
  fill = {k: v for k, v in (shared or {}).items()
          if k in SHARED_SETTINGS and k in method.option_names and k not in given}
  options = method.make_options(**given, **fill)
  check_level(method, options)
  return options


def check_level(method: Method, options: Options) -> None:
  """AttributionError unless `method` scores at `options.level` (`Method.levels`)."""
  if options.level not in method.levels:
    shown = [lv for lv in method.levels if lv != "position"]  # position edges are edges
    raise AttributionError(
        f"{method.name} scores {' and '.join(lv + 's' for lv in shown)} only; "
        f"level={options.level!r} works with "
        f"{[n for n, x in METHODS.items() if options.level in x.levels]}")


@dataclasses.dataclass
class Attribution:
  """Edge scores and how they were computed.

  Attributes:
    scores: float32 [n_senders, n_receivers] (or the method's level's shape), in the metric's
      units (0 on invalid edges).
    method, intervention, options, n_examples: provenance (`options`: the method's, as used).
    clean_metric: mean metric of the clean model over the examples.
    extras: what a whole-dataset method returns besides scores (learned masks, loss curves), and
      with `bootstrap`: "bootstrap_std" and "bootstrap_sign_fraction" (arrays of the scores'
      shape) and "bootstrap" (resamples, unit, seed).
  """

  scores: np.ndarray
  method: str
  intervention: str
  options: Options
  n_examples: int
  clean_metric: float
  extras: dict = dataclasses.field(default_factory=dict)


def attribute(cfg: ModelConfig, params, dataset: Dataset, method: str = "EAP-IG-inputs",
              options: Options | None = None, *, intervention: str = "patching",
              batch_size: int = 16, mean_dataset: Dataset | None = None, quiet: bool = False,
              resume: Progress | None = None, on_batch: Callable[[Progress], None] | None = None,
              batch_fn: Callable[[Batch], Batch] | None = None, ablation: Ablation | None = None,
              bootstrap: int | None = None, seed: int = 0, **option_values) -> Attribution:
  """Score every edge of the model's graph on `dataset` (its task's metric).

  Args:
    cfg, params: the model.
    dataset: prompt pairs; the metric is `dataset.task`'s, read at each example's last real token.
    method: a name in METHODS, or an ensemble `A+B`.
    options: the method's `Options` object (e.g. `IGOptions(ig_steps=3)`), or None to build them
      from `option_values`.
    intervention: how ablated senders are valued: "patching" (the corrupted run), "zero", "mean" or
      "mean-positional" (means over `mean_dataset`, default `dataset`). EAP-IG-inputs interpolates
      the inputs from corrupted to clean, so it takes only "patching".
    batch_size: examples per compiled call (the last batch is padded; padding rows do not count).
    quiet: no progress bars.
    resume: a `Progress` from a checkpoint; batches before `resume.next_batch` are skipped and the
      sums continue from it (the result is bitwise what an uninterrupted run gives).
    on_batch: called with the `Progress` after every batch (e.g. `Checkpointer.save`); in a
      multi-process run (`runtime.distributed`) after every round of one batch per process, on
      every process, with the merged state (process p scores the round's p-th batch).
    batch_fn: applied to every batch first, e.g. `functools.partial(sharding.shard_batch,
      mesh=mesh)` for data parallelism over a device mesh (with `sharding.shard_params`).
    ablation: a prebuilt `Ablation` of the same `intervention` (e.g. learned optimal-ablation
      values, built once with `make_ablation`), instead of building it here.
    bootstrap: B >= 2 resamples of the batches (`bootstrap.resample`): the scores' standard
      deviation and sign stability go to `extras`. Batch methods only; `seed` seeds the resampling
      (and mask training, whose options have a `seed`).
    **option_values: the method's options by name, without `options` (`Method.make_options`:
      e.g. `ig_steps=3`, `level="node"`, `exact_chunk=8`, `remat=True`); one the method does not
      have is an AttributionError.

  Returns:
    An `Attribution` with scores `[n_senders, n_receivers]` (or the level's shape) in the metric's
    units (an ensemble's are rank-normalised, an IFR's are proportions).
  """
  m = get_method(method)
  if options is None:
    options = make_options(m, {"batch_size": batch_size, "seed": seed}, **option_values)
  elif option_values:
    raise AttributionError(f"give either options or option keywords, not both "
                           f"({', '.join(sorted(option_values))})")
  else:
    check_level(m, options)
  if options.level == "position":
    raise AttributionError("level='position' scores position-level edges: call "
                           "attribution.positions.attribute_positions")
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
  options = dataclasses.replace(options,
                                progress=not quiet and (n_batches == 1 or m.fit is not None))
  if ablation is not None and ablation.kind != intervention:
    raise AttributionError(f"the ablation given is {ablation.kind!r}, not intervention="
                           f"{intervention!r}")
  if not getattr(dataset, "has_corrupted", True) and (
      m.needs_corrupted or (m.ablates and intervention == "patching")):
    why = ("it interpolates from them" if m.needs_corrupted
           else "intervention='patching' ablates to them")
    raise AttributionError(f"{m.name} needs corrupted prompts ({why}), but the dataset "
                           f"{dataset.source or ''} has none; use intervention='zero', 'mean' or "
                           f"'mean-positional' (EAP, exact), or a method that needs none "
                           f"(information-flow-routes)")
  if ablation is None and m.ablates:
    ablation = make_ablation(cfg, params, dataset, intervention, batch_size, mean_dataset)
  task = dataset.task
  valid = m.valid_mask(cfg, options)
  out_valid = m.output_mask(cfg, options)
  if m.fit is not None:  # whole-dataset methods: one call, no batches to resume
    result = m.fit(cfg, params, dataset, ablation, options)
    scores = np.asarray(result.scores, np.float64)
    base.check_finite(scores[out_valid], 0, "a score")
    return Attribution(np.where(out_valid, scores, 0.0).astype(np.float32), method, intervention,
                       options, len(dataset), float(result.clean_metric), dict(result.extras))
  keep = bootstrap is not None
  state = resume if resume is not None else Progress.empty(valid.shape, keep)
  if state.score_sum is None:
    state = dataclasses.replace(state, score_sum=np.zeros(valid.shape, np.float64))
  if state.score_sum.shape != valid.shape:
    raise AttributionError(f"resumed scores have shape {state.score_sum.shape}, expected "
                           f"{valid.shape}")
  if keep and state.batch_sums is None:
    if state.next_batch:
      raise AttributionError("the run to resume kept no per-batch sums; bootstrap needs them")
    state = dataclasses.replace(state, batch_sums=(), batch_counts=())
  bar = tqdm(total=n_batches, desc=f"{method} ({intervention})", unit="batch",
             disable=quiet or not distributed.is_writer(), initial=state.next_batch)
  # Several processes (jax.distributed): process p scores batches start + p, start + p + N, ...;
  # their states merge in batch order after each round of N batches (progress.merge_processes).
  rank, n_proc, start = distributed.process_index(), distributed.process_count(), state.next_batch
  part = None
  for i, batch in enumerate(dataset.batches(batch_size)):
    if i < start:
      continue
    if (i - start) % n_proc == rank:
      if batch_fn is not None:
        batch = batch_fn(batch)
      out = m.score_batch(cfg, task, params, batch, ablation, options)
      real = np.asarray(batch.valid)
      base.check_finite(np.asarray(out.clean)[real], i, "the clean metric")
      s = np.asarray(out.scores, np.float64)
      base.check_finite(np.asarray(out.metric)[real], i, "the metric")
      base.check_finite(s[valid], i, "a score")
      part = Progress.of_batch(s, float(out.clean_total), int(np.sum(real)), keep)
    if n_proc == 1:
      state, part = state.merge(part), None
    elif (i - start) % n_proc == n_proc - 1 or i == n_batches - 1:
      state, part = progress.merge_processes(state, part), None
    else:
      continue
    bar.update(state.next_batch - bar.n)
    if on_batch is not None:
      on_batch(state)
  bar.close()

  def finalize(x):
    return m.finalize(cfg, task, options, x)

  mean, clean = state.compute()
  scores = np.where(out_valid, finalize(np.where(valid, mean, 0.0)), 0.0)
  extras = {}
  if keep:
    std, sign = bootstrap_.resample(np.stack(state.batch_sums), np.asarray(state.batch_counts),
                                    bootstrap, seed, finalize)
    extras = {"bootstrap_std": np.where(out_valid, std, 0.0).astype(np.float32),
              "bootstrap_sign_fraction": np.where(out_valid, sign, 0.0).astype(np.float32),
              "bootstrap": {"resamples": bootstrap, "unit": "batch", "batch_size": batch_size,
                            "n_units": len(state.batch_sums), "seed": seed}}
  return Attribution(scores.astype(np.float32), method, intervention, options, len(dataset),
                     clean, extras)


def compile_ahead(cfg: ModelConfig, params, dataset: Dataset, method: str, options: Options, *,
                  intervention: str = "patching",
                  batch_size: int = 16) -> threading.Thread | None:
  """Start compiling what `attribute` will run on `dataset`, in a daemon thread, and return it;
  None where the method has nothing to compile ahead (`Method.compile_batch`), or its ablation
  needs a pass over the data first (mean, optimal).

  `find_circuit` starts it as soon as the data are loaded, so the kernel compiles while the task
  check runs; the caller joins it before `attribute` (`timing.Phases.wait_for_compile`, which counts
  any wait as compile time). Every distinct program of the batches (shape, shared-prefix plan) is
  compiled once; the thread's compiles are off the caller's critical path (`timing.in_background`).
  A failure is logged, and `attribute` then compiles for itself. Give the options and intervention
  `attribute` will get (a different one compiles programs the run will not use).
  """
  m = get_method(method)
  if m.compile_batch is None or intervention not in ("patching", "zero", "zero-all"):
    return None

  def work():
    with timing.in_background():
      try:
        ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
        seen = set()
        for batch in dataset.batches(batch_size):
          key = (batch.clean.shape, shared_prefix.plan(cfg, batch, ablation.kind))
          if key not in seen:
            seen.add(key)
            m.compile_batch(cfg, dataset.task, params, batch, ablation, options)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("compiling the %s kernel ahead failed: %s", m.name, e)

  thread = threading.Thread(target=work, name="compile-attribution-ahead", daemon=True)
  thread.start()
  return thread


def node_scores(cfg: ModelConfig, scores: np.ndarray) -> np.ndarray:
  """First-order node scores: the effect of ablating a sender's output into all its receivers.

  For gradient methods this is exactly the row sum of the (signed) edge scores, since a sender's
  output enters each downstream receiver additively. Returns float32 [n_senders].
  """
  return np.where(valid_edges(cfg), scores, 0.0).sum(1).astype(np.float32)
