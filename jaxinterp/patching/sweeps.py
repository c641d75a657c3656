"""Activation-patching sweeps, one patched component per cell (see the package's docstring for
the directions, the normalisation and the positions).

`SWEEPS` registers each kind of sweep: a per-layer site and the activation axes that index its
cells. `run_sweep` evaluates every (layer, index) cell of one sweep as one patched forward: a
`OneHotPatch` whose mask is a traced one-hot index, swept by `jax.vmap` inside one compiled call
(`_sweep_chunk`, `chunk` cells at a time), never a Python loop of forwards. `baselines` gives the
unpatched clean and corrupted metrics that normalise it; `patched_metric` is the plain one-forward
reference that checks it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.interventions.basic import Patch, Where
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward
from jaxinterp.runtime import distributed
from jaxinterp.tasks import Batch, Dataset, Task
from jaxinterp.tasks.metrics import metric_sum

Array = jax.Array

DIRECTIONS = ("noising", "denoising")


class PatchingError(ValueError):
  """Bad sweep arguments, or data on which the normalised metric is undefined."""


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One kind of sweep: a per-layer site and the activation axes that index its cells.

  Attributes:
    name: registry name (`SWEEPS`).
    site: the site name with `{layer}` for the layer.
    axes: ((axis, label), ...): axes of the site's activation enumerated by the sweep, e.g.
      ((1, "position"),) for `[batch, pos, d_model]` or ((2, "head"),) for `[batch, pos, head, d]`.
    description: one line for plots and help texts.
  """

  name: str
  site: str
  axes: tuple[tuple[int, str], ...]
  description: str = ""

  def site_of(self, layer: int) -> str:
    return self.site.format(layer=layer)


SWEEPS: dict[str, Sweep] = {s.name: s for s in (
    Sweep("resid_pre", "blocks.{layer}.hook_resid_pre", ((1, "position"),),
          "residual stream before each layer"),
    Sweep("attn_out", "blocks.{layer}.hook_attn_out", ((1, "position"),),
          "attention block output"),
    Sweep("mlp_out", "blocks.{layer}.hook_mlp_out", ((1, "position"),), "MLP output"),
    Sweep("head_out", "blocks.{layer}.attn.hook_z", ((2, "head"),),
          "each head's output (z), all positions"),
    Sweep("head_out_by_pos", "blocks.{layer}.attn.hook_z", ((1, "position"), (2, "head")),
          "each head's output (z) at each position"),
    Sweep("head_q", "blocks.{layer}.attn.hook_q", ((2, "head"),), "each head's queries"),
    Sweep("head_k", "blocks.{layer}.attn.hook_k", ((2, "head"),), "each (key/value) head's keys"),
    Sweep("head_v", "blocks.{layer}.attn.hook_v", ((2, "head"),), "each (key/value) head's values"),
    Sweep("head_pattern", "blocks.{layer}.attn.hook_pattern", ((1, "head"),),
          "each head's attention pattern"),
)}

DEFAULT_SWEEPS = ("resid_pre", "attn_out", "mlp_out", "head_out", "head_q", "head_k", "head_v",
                  "head_pattern")


def get_sweep(name: str) -> Sweep:
  """The registered `Sweep` called `name`."""
  if name not in SWEEPS:
    raise PatchingError(f"unknown sweep {name!r}; choose from {', '.join(SWEEPS)}")
  return SWEEPS[name]


@flax.struct.dataclass
class OneHotPatch:
  """Replace the entries selected by a traced boolean mask with `value`: x' = where(mask, value, x).

  Unlike `interventions.Patch` with a (static) `Where`, the selection is an array, so `jax.vmap` can
  sweep it.

  Attributes:
    value: the source activation, same shape as the site's.
    mask: Bool[Array, "*sizes"] over the activation axes `axes` (all other axes broadcast).
    axes: the activation axes the mask's dimensions index (static).
  """

  value: Array
  mask: Array
  axes: tuple = flax.struct.field(pytree_node=False, default=(1,))

  def __call__(self, x: Array) -> Array:
    shape = [1] * x.ndim
    for a, n in zip(self.axes, self.mask.shape, strict=True):
      shape[a] = n
    return jnp.where(self.mask.reshape(shape), self.value.astype(x.dtype), x)


@dataclasses.dataclass
class PatchingResult:
  """A finished sweep.

  Attributes:
    sweep: the `Sweep`; direction: "noising" or "denoising".
    metric: float64 [n_layers, *sizes], mean patched metric per cell.
    normalized: (metric - m_corrupted) / (m_clean - m_corrupted).
    m_clean, m_corrupted: mean metric of the unpatched clean and corrupted runs.
    axis_labels: ("layer", *labels of the swept axes): "position", "head", or "kv_head" for the
      key/value heads of a GQA model.
    n_examples: examples averaged over.
  """

  sweep: Sweep
  direction: str
  metric: np.ndarray
  normalized: np.ndarray
  m_clean: float
  m_corrupted: float
  axis_labels: tuple[str, ...]
  n_examples: int

  def to_npz_dict(self) -> dict[str, np.ndarray]:
    """Arrays for `np.savez`: normalized, metric, baselines and labels."""
    return {"normalized": self.normalized, "metric": self.metric,
            "m_clean": np.float64(self.m_clean), "m_corrupted": np.float64(self.m_corrupted),
            "axis_labels": np.asarray(self.axis_labels), "sweep": np.asarray(self.sweep.name),
            "site": np.asarray(self.sweep.site), "direction": np.asarray(self.direction),
            "n_examples": np.int64(self.n_examples)}


# ----------------------------------------------------------------------------------------- compiled


@functools.partial(jax.jit, static_argnames=("cfg", "task"))
def _baselines(cfg: ModelConfig, task: Task, params, batch: Batch):
  """Metric sums of the clean and corrupted runs, and the clean logits."""
  clean_logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
  corrupt_logits = forward(cfg, params, batch.corrupted, attention_mask=batch.mask)
  return (metric_sum(task, clean_logits, batch, clean_logits)[0],
          metric_sum(task, corrupt_logits, batch, clean_logits)[0], clean_logits)


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def _collect(cfg: ModelConfig, sites: tuple[str, ...], params, tokens, mask):
  return forward(cfg, params, tokens, attention_mask=mask, collect=sites)[1]


@functools.partial(jax.jit, static_argnames=("cfg", "task", "sweep", "direction"))
def _sweep_chunk(cfg: ModelConfig, task: Task, sweep: Sweep, direction: str, params, batch: Batch,
                 sources: tuple, clean_logits: Array, cells: Array) -> Array:
  """Metric sums with one cell patched at a time: `cells` Int[Array, "chunk"] ->
  Float[Array, "chunk"].

  `sources[l]` is layer l's activation from the other run; cell c is the flat index into the grid
  `[n_layers, *sizes]`.
  """
  sizes = tuple(sources[0].shape[a] for a, _ in sweep.axes)
  grid = (cfg.n_layers,) + sizes
  n_cells = math.prod(grid)
  axes = tuple(a for a, _ in sweep.axes)
  base = batch.clean if direction == "noising" else batch.corrupted

  def one(cell):
    onehot = (jnp.arange(n_cells) == cell).reshape(grid)
    ivs = {sweep.site_of(li): OneHotPatch(sources[li], onehot[li], axes)
           for li in range(cfg.n_layers)}
    logits = forward(cfg, params, base, attention_mask=batch.mask, interventions=ivs)
    return metric_sum(task, logits, batch, clean_logits)[0]

  return jax.vmap(one)(cells)


# ------------------------------------------------------------------------------------------ public


def _check_dataset(cfg: ModelConfig, dataset: Dataset) -> None:
  if len(dataset) == 0:
    raise PatchingError("the dataset is empty")
  if dataset.clean.shape != dataset.corrupted.shape:
    raise PatchingError(f"clean and corrupted prompts have different shapes {dataset.clean.shape} "
                        f"vs {dataset.corrupted.shape}; patching needs aligned positions")
  if dataset.clean.shape[1] > cfg.n_ctx:
    raise PatchingError(f"prompts of {dataset.clean.shape[1]} tokens exceed the model's context of "
                        f"{cfg.n_ctx}")
  for name, toks in (("clean", dataset.clean), ("corrupted", dataset.corrupted)):
    if toks.size and (toks.min() < 0 or toks.max() >= cfg.d_vocab):
      raise PatchingError(f"{name} token ids lie outside the model's vocabulary of {cfg.d_vocab}")


def baselines(cfg: ModelConfig, params, dataset: Dataset, *, batch_size: int = 16
              ) -> tuple[float, float]:
  """(m_clean, m_corrupted): mean task metric of the unpatched clean and corrupted runs."""
  _check_dataset(cfg, dataset)

  def one(i, batch):  # process p of N runs batches p, p + N, ... (`distributed.sum_split`)
    c, k, _ = _baselines(cfg, dataset.task, params, batch)
    return np.asarray([float(c), float(k)], np.float64)

  clean, corrupt = distributed.sum_split(dataset.batches(batch_size, bucket=None), one,
                                         np.zeros(2, np.float64))
  return float(clean) / len(dataset), float(corrupt) / len(dataset)


def run_sweep(cfg: ModelConfig, params, dataset: Dataset, sweep: str | Sweep, *,
              direction: str = "noising", batch_size: int = 16, chunk: int = 32,
              quiet: bool = False) -> PatchingResult:
  """Patch every cell of one sweep and return the mean (and normalised) metric per cell.

  Args:
    cfg, params: the model.
    dataset: clean/corrupted prompt pairs of equal lengths; its task gives the metric.
    sweep: a name in `SWEEPS` (or a `Sweep`).
    direction: "noising" (clean run, corrupted activation) or "denoising" (the reverse).
    batch_size: examples per batch (every batch is padded to the dataset's width).
    chunk: cells (patched forwards) per compiled `vmap` call; lower it to save memory.
    quiet: no progress bar.

  Returns:
    a `PatchingResult` with grids of shape [n_layers, *sizes] (sizes: positions and/or heads).

  In a multi-process run (`runtime.distributed`) process p runs batches p, p + N, ... and the
  per-batch float64 sums (cells and baselines) are added in batch order on every process
  (`distributed.sum_split`): every process returns one process's result, bitwise. A collective.

  Raises:
    PatchingError: unknown sweep/direction, bad data, or clean and corrupted runs with the same
      mean metric (the normalisation is undefined).
  """
  sw = sweep if isinstance(sweep, Sweep) else get_sweep(sweep)
  if direction not in DIRECTIONS:
    raise PatchingError(f"unknown direction {direction!r}; choose from {DIRECTIONS}")
  if not isinstance(chunk, int) or chunk < 1:
    raise PatchingError(f"chunk must be a positive integer, got {chunk!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise PatchingError(f"batch_size must be a positive integer, got {batch_size!r}")
  _check_dataset(cfg, dataset)
  task = dataset.task
  sites = tuple(sw.site_of(li) for li in range(cfg.n_layers))
  m_clean, m_corrupt = baselines(cfg, params, dataset, batch_size=batch_size)
  if not math.isfinite(m_clean) or not math.isfinite(m_corrupt):
    raise PatchingError(f"the clean or corrupted metric is not finite ({m_clean}, {m_corrupt})")
  denom = m_clean - m_corrupt
  if abs(denom) <= 1e-9 * max(1.0, abs(m_clean)):
    raise PatchingError(f"the clean and corrupted runs give the same mean metric ({m_clean:.6g}); "
                        f"the normalised patching effect is undefined for this data")
  batches = dataset.batches(batch_size, bucket=None)
  first = next(dataset.batches(batch_size, bucket=None))
  shapes = jax.eval_shape(functools.partial(_collect, cfg, sites), params, first.clean, first.mask)
  sizes = tuple(shapes[sites[0]].shape[a] for a, _ in sw.axes)
  n_cells = cfg.n_layers * math.prod(sizes)
  c = min(chunk, n_cells)
  steps = distributed.n_owned(math.ceil(len(dataset) / batch_size)) * math.ceil(n_cells / c)
  bar = tqdm(total=steps, desc=f"patching {sw.name}", disable=quiet or not distributed.is_writer(),
             leave=False)

  def one(i, batch):  # process p of N runs batches p, p + N, ... (`distributed.sum_split`)
    sums = np.zeros(n_cells, np.float64)
    clean_logits = _baselines(cfg, task, params, batch)[2]
    src_tokens = batch.corrupted if direction == "noising" else batch.clean
    cache = _collect(cfg, sites, params, src_tokens, batch.mask)
    sources = tuple(cache[s] for s in sites)
    for start in range(0, n_cells, c):
      cells = np.arange(start, start + c)
      cells = np.minimum(cells, n_cells - 1)  # pad the last chunk (one compiled shape)
      out = np.asarray(_sweep_chunk(cfg, task, sw, direction, params, batch, sources, clean_logits,
                                    jnp.asarray(cells, jnp.int32)), np.float64)
      n_real = min(c, n_cells - start)
      sums[start:start + n_real] = out[:n_real]
      bar.update(1)
    return sums

  totals = distributed.sum_split(batches, one, np.zeros(n_cells, np.float64))
  bar.close()
  n = len(dataset)
  metric = (totals / n).reshape((cfg.n_layers,) + sizes)
  if not np.all(np.isfinite(metric)):
    raise PatchingError(f"the metric became NaN or infinite during the {sw.name} sweep")
  # Key/value sweeps of a GQA model enumerate its key/value heads, not its query heads.
  labels = tuple("kv_head" if label == "head" and size != cfg.n_heads else label
                 for (_, label), size in zip(sw.axes, sizes, strict=True))
  return PatchingResult(sweep=sw, direction=direction, metric=metric,
                        normalized=(metric - m_corrupt) / denom, m_clean=m_clean,
                        m_corrupted=m_corrupt, axis_labels=("layer",) + labels, n_examples=n)


def patched_metric(cfg: ModelConfig, params, dataset: Dataset, sweep: str | Sweep, layer: int,
                   index: Sequence[int], *, direction: str = "noising",
                   batch_size: int = 16) -> float:
  """The mean metric with a single cell patched, by one plain forward per batch (no `vmap`).

  A reference implementation with `interventions.Patch` and a static `Where`, for checking sweeps.
  `index` gives the cell's position and/or head along the sweep's axes; an entry may also be a
  sequence of indices, patched together (e.g. every position at once).
  """
  sw = sweep if isinstance(sweep, Sweep) else get_sweep(sweep)
  index = tuple(index)
  if len(index) != len(sw.axes):
    raise PatchingError(f"sweep {sw.name} needs {len(sw.axes)} index value(s), got {index}")
  site = sw.site_of(layer)
  total = 0.0
  for batch in dataset.batches(batch_size, bucket=None):
    src = batch.corrupted if direction == "noising" else batch.clean
    base = batch.clean if direction == "noising" else batch.corrupted
    value = forward(cfg, params, src, attention_mask=batch.mask, collect=(site,))[1][site]
    # `Where` names axis 1 "positions" and axis 2 "heads" (for hook_pattern [batch, head, q, k] the
    # head axis is 1, so it is selected as "positions").
    axes = {1: "positions", 2: "heads"}
    where = Where.of(**{axes[axis]: i for (axis, _), i in zip(sw.axes, index, strict=True)})
    clean_logits = forward(cfg, params, batch.clean, attention_mask=batch.mask)
    logits = forward(cfg, params, base, attention_mask=batch.mask,
                     interventions={site: Patch(value, where)})
    total += float(metric_sum(dataset.task, logits, batch, clean_logits)[0])
  return total / len(dataset)
