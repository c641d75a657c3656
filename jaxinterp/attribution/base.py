"""What every attribution method shares: the `Method` record, its options and per-batch result,
and the helpers below every method (the metric at the last real token, sender outputs, `Shift`).

A method is data: `Method(name, description, score_batch, Options, interventions)`. Its
`score_batch(cfg, task, params, batch, ablation, options) -> BatchScores` scores one batch;
`attribution.attribute` does the rest (batching, resuming, progress, averaging, finite checks) once
for every method. This module imports nothing else from `jaxinterp.attribution`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.circuits import convention
from jaxinterp.circuits.layout import valid_edges
from jaxinterp.models import edges as E
from jaxinterp.models.config import ModelConfig
from jaxinterp.runtime import sizes
from jaxinterp.tasks import Batch, Task

if TYPE_CHECKING:
  from jaxinterp.attribution import ablation
  from jaxinterp.tasks import Dataset

Array = jax.Array


class AttributionError(ValueError):
  """Bad attribution arguments, or a metric that became NaN/inf (the batch is named)."""


# ------------------------------------------------------------------------------ method interface


LEVELS = ("edge", "node", "neuron", "position")


@dataclasses.dataclass(frozen=True)
class Options:
  """Options every method takes. Methods extend this with their own frozen dataclass, whose
  `__post_init__` validates its fields; `Method.make_options` builds one from keywords.

  Attributes:
    remat: rematerialise blocks in the backward pass (less memory, same scores).
    level: what is scored: "edge" (Float [n_senders, n_receivers]), "node" (Float [n_senders]: the
      effect of ablating a node's output into every receiver, as the `eap` package's
      `attribute_node`) or "neuron" (Float [n_senders, d_model]: the same per dimension of each
      node's output) or "position" (every edge at each token position and PEAP's crossing edges:
      `attribution.positions.attribute_positions`, not `attribute`); `Method.levels` says which a
      method supports.
    progress: show the method's own inner progress bar (the driver sets it for one-batch runs).
  """

  remat: bool = False
  progress: bool = False
  level: str = dataclasses.field(default="edge", metadata={
      "choices": LEVELS, "help": "Score and select edges, nodes (NAP, exact node patching) or "
      "neurons (each dimension of a node's output), as the eap package's attribute_node, or "
      "position-level edges (each edge at each token position, PEAP's crossing edges: "
      "a0.h3@5->a1.h0<k>@9; no faithfulness curve); --top_n then counts nodes, neurons or "
      "position edges."})

  def __post_init__(self):
    if self.level not in LEVELS:
      raise AttributionError(f"level must be one of {LEVELS}, got {self.level!r}")


@dataclasses.dataclass(frozen=True)
class BatchScores:
  """One batch's contribution, as `score_batch` returns it.

  Attributes:
    scores: Float[Array, "sender receiver"], the SUM over the batch's real rows of
      m(edge ablated) - m(clean) (or its estimate), zero on invalid edges.
    metric: Float[Array, "batch"], the per-example metric of the method's last run (checked finite).
    clean: Float[Array, "batch"], the per-example metric of the clean model.
    clean_total: scalar, the sum of `clean` over the real rows.
  """

  scores: Array
  metric: Array
  clean: Array
  clean_total: Array


ScoreBatch = Callable[[ModelConfig, Task, dict, Batch, "ablation.Ablation", Options], BatchScores]


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What a whole-dataset method (`Method.fit`) returns.

  Attributes:
    scores: float [n_senders, n_receivers] (or the method's `valid` shape), higher |score| = more
      important; the method's description says their units.
    clean_metric: mean metric of the clean model over the examples.
    extras: anything else worth keeping (learned masks, loss curves), saved by the caller as it
      likes.
  """

  scores: np.ndarray
  clean_metric: float
  extras: dict = dataclasses.field(default_factory=dict)


Fit = Callable[[ModelConfig, dict, "Dataset", "ablation.Ablation", Options], FitResult]


@dataclasses.dataclass(frozen=True)
class Method:
  """An attribution method: a name, a one-line description, and how it scores.

  Most methods score one batch at a time (`score_batch`); `attribute` sums the batches and averages.
  Methods that need the whole dataset at once (mask training, greedy search) give `fit` instead,
  which extends the interface without widening it: `attribute` then calls `fit` once.

  Attributes:
    name: the `--method` name.
    description: one line for `--help` and the README's method table.
    score_batch: `(cfg, task, params, batch, ablation, options) -> BatchScores`, or None with `fit`.
    options: the method's `Options` subclass.
    interventions: the ablations it supports (None: all of `ablation.INTERVENTIONS`).
    fit: `(cfg, params, dataset, ablation, options) -> FitResult` for whole-dataset methods.
    needs_corrupted: it reads the corrupted prompts whatever the intervention (EAP-IG-inputs and
      clean-corrupted interpolate from them); with `intervention="patching"` every method that
      `ablates` needs them too. `attribute` refuses a dataset without corrupted prompts then.
    ablates: whether its scores use the ablation at all (information-flow routes does not: it
      ignores `intervention`, and `attribute` builds no ablation for it).
    convention: what the sign of its scores means (`circuits.convention`): None for the task
      metric's (`convention.for_task`: "metric" for higher-is-better metrics, whose important
      edges are negative); "loss" (higher = more important, whatever the task) for proportions
      such as IFR's and for ensembles.
    levels: the `Options.level`s it scores (a subset of LEVELS).
    checkpoints_always: a run is long whatever its number of batches (exact patching), so a
      pipeline checkpoints it after every batch.
    compile_batch: `(cfg, task, params, batch, ablation, options) -> None`, optional: compile what
      `score_batch` runs on a batch of this shape, running nothing (`attribution.compile_ahead`
      calls it in a thread while the caller loads and checks the data).
  """

  name: str
  description: str
  score_batch: ScoreBatch | None
  options: type = Options
  interventions: tuple[str, ...] | None = None
  fit: Fit | None = None
  needs_corrupted: bool = False
  ablates: bool = True
  convention: str | None = None
  levels: tuple[str, ...] = ("edge",)
  checkpoints_always: bool = False
  compile_batch: Callable[..., None] | None = None

  def score_convention(self, task: Task) -> str:
    """The sign convention of this method's scores on `task` ("metric" or "loss")."""
    return self.convention or convention.for_task(task)

  @property
  def option_names(self) -> frozenset[str]:
    """The keywords `make_options` takes: the fields of the method's options."""
    return frozenset(f.name for f in dataclasses.fields(self.options))

  def options_among(self, settings: Mapping[str, Any]) -> dict:
    """The entries of `settings` that are options of this method, for a sweep that runs several
    methods with one set of settings (e.g. `attribute(..., **m.options_among({"ig_steps": 5}))`):
    the caller asks for the filtering, `make_options` never does it."""
    return {k: v for k, v in settings.items() if k in self.option_names}

  def make_options(self, **kwargs) -> Options:
    """The method's options from keywords; AttributionError naming its options for a keyword it
    has no field for (nothing is dropped silently)."""
    unknown = sorted(set(kwargs) - self.option_names)
    if unknown:
      raise AttributionError(f"{self.name} has no option {unknown[0]!r}; its options are "
                             f"{', '.join(sorted(self.option_names))}")
    return self.options(**kwargs)

  def option_values(self, options: Options) -> dict:
    """The values of `options` worth recording (every field but `progress`), by name."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if f.name != "progress"}

  def valid_mask(self, cfg: ModelConfig, options: Options) -> np.ndarray:
    """Bool array: the shape of this method's summed scores and which entries are real
    (`level_valid`: the valid edges, every node or every neuron, as `options.level` says)."""
    return level_valid(cfg, options)

  def finalize(self, cfg: ModelConfig, task: Task, options: Options,
               mean_scores: np.ndarray) -> np.ndarray:
    """The scores from the mean of the batches' sums (`valid_mask`'s shape), applied by
    `attribute` after averaging and to every bootstrap resample: the identity, except for a
    method whose scores combine others' (an ensemble rank-normalises its members' here). The
    result has `output_mask`'s shape."""
    return mean_scores

  def output_mask(self, cfg: ModelConfig, options: Options) -> np.ndarray:
    """Bool array of the final scores (after `finalize`); `valid_mask` unless a subclass (an
    ensemble, whose members' sums are stacked) says otherwise."""
    return self.valid_mask(cfg, options)


# ----------------------------------------------------------------------------------- helpers


def ig_alphas(steps: int, convention: str = "eap", eap_start: int = 0) -> np.ndarray:
  """Interpolation points alpha_k = k/m for integrated gradients.

  "eap" follows the `eap` package: k = eap_start .. eap_start + m - 1, where it starts at 0 for
  EAP-IG-inputs' edges and at 1 for activations and nodes. "paper" uses k = 1..m (ending at the
  clean input) for every method.
  """
  if not isinstance(steps, int) or steps < 1:
    raise AttributionError(f"ig_steps must be a positive integer, got {steps!r}")
  if convention not in ("eap", "paper"):
    raise AttributionError(f"ig_convention must be 'eap' or 'paper', got {convention!r}")
  if eap_start not in (0, 1) or isinstance(eap_start, bool):
    raise AttributionError(f"eap_start must be 0 or 1, got {eap_start!r}")
  k = np.arange(steps) + (eap_start if convention == "eap" else 1)
  return (k / steps).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class IGOptions(Options):
  """Options of the integrated-gradient methods.

  Attributes:
    ig_steps: m, the number of integrated-gradient steps.
    ig_convention: "eap" (as the `eap` package: alpha = k/m with k = 0..m-1 for EAP-IG-inputs'
      edges, k = 1..m otherwise) or "paper" (k = 1..m).
    memory_budget: a size such as "2GB" or "512MiB", or None (no limit).
  """

  ig_steps: int = 5
  ig_convention: str = dataclasses.field(default="eap", metadata={"choices": ("eap", "paper")})
  memory_budget: str | None = dataclasses.field(default=None, metadata={
      "help": "cap on the attribution kernel's temporary memory per batch, e.g. 2GB or 512MiB "
      "(EAP-IG-inputs and EAP-IG-activations at --level=edge only): the batch's rows (and "
      "EAP-IG-inputs' positions) are scored in as many chunks as it takes (same scores to float "
      "rounding; a budget below one row is refused, naming the least that works). Default: no "
      "cap, one chunk."})

  def __post_init__(self):
    super().__post_init__()
    ig_alphas(self.ig_steps, self.ig_convention)  # validates
    if self.memory_budget is not None:
      try:
        sizes.parse_bytes(self.memory_budget, "memory_budget")
      except sizes.SizeError as e:
        raise AttributionError(str(e)) from None
      if self.level != "edge":
        raise AttributionError(f"--memory_budget is for --level=edge only, not "
                               f"--level={self.level}")

  def alphas(self, eap_start: int) -> np.ndarray:
    """`ig_alphas` of these options (`eap_start`: where the "eap" convention starts k)."""
    return ig_alphas(self.ig_steps, self.ig_convention, eap_start)


def level_valid(cfg: ModelConfig, options: Options) -> np.ndarray:
  """Bool array of a level's score shape: the valid edges, every node [n_senders], or every
  neuron [n_senders, d_model] (`options.level`)."""
  if options.level == "node":
    return np.ones(E.n_senders(cfg), bool)
  if options.level == "neuron":
    return np.ones((E.n_senders(cfg), cfg.d_model), bool)
  return valid_edges(cfg)


@flax.struct.dataclass
class Shift:
  """x -> x + delta: the additive side input the fused-head kernels put at a site (delta may be
  zero when only its gradient is wanted)."""

  delta: Array

  def __call__(self, x):
    return x + self.delta.astype(x.dtype)


@flax.struct.dataclass
class Blend:
  """x -> x + s * (alpha * clean + (1 - alpha) * corrupted - x): EAP-IG-activations' side input,
  which sets a site to its clean and corrupted values interpolated at alpha where s = 1 and leaves
  it as it is where s = 0 (one "layer node" at a time, with s one-hot over them)."""

  clean: Array
  corrupted: Array
  s: Array
  alpha: Array

  def __call__(self, x):
    target = self.alpha * self.clean + (1 - self.alpha) * self.corrupted
    return x + self.s * (target.astype(x.dtype) - x)


def chunk_budget_bytes() -> float:
  """The memory a kernel's vmapped copies may take by default (exact patching's edges, optimal
  ablation's senders): a quarter of the accelerator's memory, or 4 GB where the device does not
  report it (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit", 16e9) / 4


def block_floats_per_position(cfg: ModelConfig, n_pos: int) -> int:
  """Float32 values one plain forward keeps per position and block, as the chunk sizes and
  `memory_budget`'s plans count them: the residual stream, norms, q/k/v and output (`10 d`), the
  MLP's activations (`3 d_mlp`) and the attention pattern and scores (`2 H pos`)."""
  return 10 * cfg.d_model + 3 * cfg.d_mlp + 2 * cfg.n_heads * n_pos


def ones(cfg: ModelConfig, dtype=jnp.float32) -> Array:
  """All-ones edge weights, Float[Array, "sender receiver"]: the clean model in graph form."""
  return jnp.ones((E.n_senders(cfg), E.n_receivers(cfg)), dtype)


def check_finite(values: np.ndarray, batch_index: int, what: str) -> None:
  """Raise AttributionError naming the batch and rows if `values` has a NaN or inf."""
  if not np.all(np.isfinite(values)):
    bad = np.flatnonzero(~np.isfinite(values)).tolist()
    raise AttributionError(f"{what} is NaN/inf in batch {batch_index} (rows {bad[:10]}); check the "
                           f"labels and the model for these examples")
