"""Activation-patching sweeps (TransformerLens `patching` style), vectorised with `jax.vmap`.

A sweep patches one component at a time, e.g. the residual stream before layer l at position p, with
its value from the other run, and records the task metric. Every (layer, index) cell of a sweep is
one patched forward; the cells are evaluated by `jax.vmap` over a one-hot index inside one compiled
call (in chunks of `chunk` cells to bound memory), never by a Python loop of forwards.

Direction:

* `"noising"` (default): run the *clean* prompt and patch in the *corrupted* run's activation. A
  cell near 0 means the component carries the clean behaviour (knocking it out destroys it).
* `"denoising"` (TransformerLens' `get_act_patch_*` default): run the *corrupted* prompt and patch
  in the *clean* activation. A cell near 1 means the component alone restores the behaviour.

Both are normalised like TransformerLens' patching demos:

    normalized = (m_patched - m_corrupted) / (m_clean - m_corrupted)

where each m is the mean of the task's per-example metric over the dataset (the task's labels are
the clean answers in both directions). So 1 is the clean model's behaviour and 0 the corrupted
run's. For example, noising `resid_pre` of layer 0 at every position gives exactly the corrupted run
(0).

Sweeps (`SWEEPS`), each a grid `[n_layers, ...]`:

| name               | site                           | grid                           |
|--------------------|--------------------------------|--------------------------------|
| `resid_pre`        | `blocks.{l}.hook_resid_pre`    | layer x position               |
| `attn_out`         | `blocks.{l}.hook_attn_out`     | layer x position               |
| `mlp_out`          | `blocks.{l}.hook_mlp_out`      | layer x position               |
| `head_out`         | `blocks.{l}.attn.hook_z`       | layer x head (all positions)   |
| `head_out_by_pos`  | `blocks.{l}.attn.hook_z`       | layer x position x head        |
| `head_q`           | `blocks.{l}.attn.hook_q`       | layer x head                   |
| `head_k`, `head_v` | `blocks.{l}.attn.hook_k/v`     | layer x kv head (GQA: fewer)   |
| `head_pattern`     | `blocks.{l}.attn.hook_pattern` | layer x head                   |

Positions: batches are built with `Dataset.batches(batch_size, bucket=None)`, so every batch has the
dataset's full width P and a position sweep has P columns. Rows are aligned at their positions
(position p is token p of every prompt, BOS included; a corrupted prompt of another length was
fitted to its clean one when the data loaded, as EAP-IG and MIB align them). For a row shorter
than P, patching a position past its last real token cannot change its metric (attention is
causal and the metric is read at the last real token), so such cells measure only the longer
rows. Use prompts of one length (e.g. a template task) for clean per-position maps.

`activation_patching(PatchingConfig(...), out)` is `experiments/activation_patching.py`'s pipeline:
it loads the model and data, runs the sweeps and writes their heatmaps and arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinterp.interventions.basic import Patch, Where
from jaxinterp.models.config import ModelConfig
from jaxinterp.models.transformer import forward
from jaxinterp.runtime import files, inputs
from jaxinterp.tasks import Batch, Dataset, Task
from jaxinterp.tasks.metrics import metric_sum
from jaxinterp.viz import plots

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
  clean = corrupt = 0.0
  for batch in dataset.batches(batch_size, bucket=None):
    c, k, _ = _baselines(cfg, dataset.task, params, batch)
    clean, corrupt = clean + float(c), corrupt + float(k)
  return clean / len(dataset), corrupt / len(dataset)


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
  n_batches = math.ceil(len(dataset) / batch_size)
  totals: np.ndarray | None = None
  bar = tqdm(total=n_batches, desc=f"patching {sw.name}", disable=quiet, leave=False)
  for batch in dataset.batches(batch_size, bucket=None):
    clean_logits = _baselines(cfg, task, params, batch)[2]
    src_tokens = batch.corrupted if direction == "noising" else batch.clean
    cache = _collect(cfg, sites, params, src_tokens, batch.mask)
    sources = tuple(cache[s] for s in sites)
    sizes = tuple(sources[0].shape[a] for a, _ in sw.axes)
    n_cells = cfg.n_layers * math.prod(sizes)
    if totals is None:
      totals = np.zeros(n_cells, np.float64)
      bar.total = n_batches * math.ceil(n_cells / chunk)
      bar.refresh()
    c = min(chunk, n_cells)
    for start in range(0, n_cells, c):
      cells = np.arange(start, start + c)
      cells = np.minimum(cells, n_cells - 1)  # pad the last chunk (one compiled shape)
      out = np.asarray(_sweep_chunk(cfg, task, sw, direction, params, batch, sources, clean_logits,
                                    jnp.asarray(cells, jnp.int32)), np.float64)
      n_real = min(c, n_cells - start)
      totals[start:start + n_real] += out[:n_real]
      bar.update(1)
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


# ----------------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class PatchingConfig:
  """What `activation_patching` sweeps, on which model and data. Fields named as the binary's
  flags."""

  model: str = "toy"  # 'toy', an HF checkpoint dir or an orbax conversion
  tokenizer: str | None = None  # a tokenizer.json (or its directory), for a model without one
  task: str = "induction"
  data: str | None = None  # task CSV (or MIB copy); optional for induction (generated)
  n_examples: int = 16  # examples to average over
  batch_size: int = 16
  seed: int = 0  # seed of generated data
  sweeps: str = ",".join(DEFAULT_SWEEPS)  # comma-separated names in `SWEEPS`
  direction: str = "noising"  # or "denoising"
  patch_chunk: int = 32  # patched forwards per compiled vmap call
  skip_bad_rows: bool = False  # leave out unusable --data rows (reported) instead of stopping
  mib_split: str = "train"  # the split of a local copy of an MIB dataset (`data`)


def position_labels(dataset: Dataset, tokenizer=None) -> list[str]:
  """Position labels: index, plus the first example's token (decoded with `tokenizer` if there is
  one, else its id) when all prompts share one length."""
  labels = [str(i) for i in range(dataset.clean.shape[1])]
  if len(set(dataset.lengths.tolist())) != 1:
    return labels
  out = []
  for i, t in enumerate(dataset.clean[0]):
    text = str(int(t))
    if tokenizer is not None:
      try:
        decoded = tokenizer.decode([int(t)], skip_special_tokens=False)
        text = (decoded if decoded.strip() else tokenizer.id_to_token(int(t))) or text
      except Exception:  # noqa: BLE001 - an undecodable id keeps its number
        pass
    out.append(f"{i}:{text[:12]}")
  return out


def neutral(direction: str) -> float:
  """The normalised value of a cell that has no effect: 1 when noising (the clean run unchanged),
  0 when denoising (the corrupted run unchanged)."""
  return 1.0 if direction == "noising" else 0.0


def strongest(result: PatchingResult) -> dict | None:
  """The cell furthest from `neutral` (first on ties): {"cell": {axis: index}, "normalized": its
  value}, or None when no cell moves the normalised metric by 1e-3. The console and patching.json
  report this, the .npz and the PNG hold the same `normalized` value."""
  v = result.normalized
  idx = np.unravel_index(int(np.argmax(np.abs(v - neutral(result.direction)))), v.shape)
  if abs(v[idx] - neutral(result.direction)) < 1e-3:
    return None
  return {"cell": {lab: int(i) for lab, i in zip(result.axis_labels, idx, strict=True)},
          "normalized": float(v[idx])}


def _print(dataset: Dataset, direction: str, results: dict[str, PatchingResult], out: str) -> None:
  first = next(iter(results.values()))
  print(f"{dataset.task.name} on {len(dataset)} examples ({direction}): clean metric "
        f"{first.m_clean:.4f}, corrupted {first.m_corrupted:.4f}")
  print(f"cells: normalised metric {plots.NORMALIZED} (1 = clean behaviour, 0 = corrupted; no "
        f"effect = {neutral(direction):g} when {direction}), as in the PNGs and .npz files")
  for name, r in results.items():
    top, shape = strongest(r), str(r.normalized.shape)
    if top is None:
      print(f"  {name:16s} {shape:14s} no cell has an effect")
    else:
      cell = ", ".join(f"{lab} {i}" for lab, i in top["cell"].items())
      print(f"  {name:16s} {shape:14s} strongest cell: {cell} -> {top['normalized']:+.3f}")
  print(f"wrote {len(results)} heatmaps and .npz files to {out}")


def run_record(config: PatchingConfig) -> files.RunRecord:
  """The run's record in `out/run.json`: the config and its data file's digest."""
  settings = dataclasses.asdict(config)
  if config.data:
    settings.update(data=os.path.abspath(config.data), data_sha256=inputs.file_digest(config.data))
  return files.RunRecord("activation_patching", settings, ("task", "sweeps", "model"))


def activation_patching(config: PatchingConfig, out: str, *,
                        overwrite: bool = False) -> dict[str, PatchingResult]:
  """Run `config.sweeps` and write `{sweep}.png`, `{sweep}.npz` and `patching.json` (baselines,
  position labels, the normalisation, each sweep's site, axes, shape and strongest cell) under
  `out`, then `DONE`; prints a summary (each sweep's strongest cell). The console, the PNGs, the
  .npz files (`normalized`) and patching.json show one number per cell: `plots.NORMALIZED`. Bad
  input raises `inputs.InputError`.

  `out` holding another run (other settings, or another binary's) is refused unless `overwrite`;
  holding this same run, finished, it is left as it is and the result is empty."""
  sweeps = [s.strip() for s in config.sweeps.split(",") if s.strip()]
  if not sweeps:
    raise inputs.InputError("--sweeps is empty")
  unknown = [s for s in sweeps if s not in SWEEPS]
  if unknown:
    raise inputs.InputError(f"unknown sweep(s) {unknown}; choose from {', '.join(SWEEPS)}")
  direction = config.direction
  if direction not in DIRECTIONS:
    raise inputs.InputError(f"--direction={direction}: choose from {', '.join(DIRECTIONS)}")
  batch_size = inputs.positive("batch_size", config.batch_size)
  chunk = inputs.positive("patch_chunk", config.patch_chunk)
  inputs.positive("n_examples", config.n_examples)

  record = run_record(config)
  with inputs.run_dir(out, record=record, overwrite=overwrite) as held:
    if held.complete:
      inputs.already_complete(out, record)
      return {}
    model = inputs.load_model(config.model, tokenizer=config.tokenizer)
    dataset = inputs.load_dataset(model, config.model, config.task, config.data,
                                  config.n_examples, seed=config.seed,
                                  skip_bad_rows=config.skip_bad_rows, mib_split=config.mib_split)
    results = {}
    try:
      for name in tqdm(sweeps, desc="sweeps"):
        results[name] = run_sweep(model.cfg, model.params, dataset, name, direction=direction,
                                  batch_size=batch_size, chunk=chunk)
    except PatchingError as e:
      raise inputs.InputError(str(e)) from None

    labels = position_labels(dataset, model.tokenizer)
    outputs = [f"{n}.{ext}" for n in results for ext in ("npz", "png")] + ["patching.json"]
    with held.writing(outputs):
      for name, r in results.items():
        files.atomic_savez(os.path.join(out, f"{name}.npz"), **r.to_npz_dict())
        plots.plot_patching(r, os.path.join(out, f"{name}.png"),
                            title=f"activation patching, {dataset.task.name}",
                            position_labels=labels)
      first = next(iter(results.values()))
      files.atomic_write_json(os.path.join(out, "patching.json"), {
          "config": dataclasses.asdict(config),
          "model": model.path, "task": dataset.task.name, "data": dataset.source,
          "n_examples": len(dataset), "direction": direction, "m_clean": first.m_clean,
          "m_corrupted": first.m_corrupted, "positions": labels,
          "normalized": plots.NORMALIZED, "no_effect": neutral(direction),
          "sweeps": {n: {"site": r.sweep.site, "axes": list(r.axis_labels),
                         "shape": list(r.normalized.shape), "strongest": strongest(r)}
                     for n, r in results.items()}})
  _print(dataset, direction, results, out)
  return results
