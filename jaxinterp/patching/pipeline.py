"""`activation_patching(PatchingConfig(...), out)`: `experiments/activation_patching.py`'s pipeline.

It loads the model and data, runs the sweeps (`sweeps.run_sweep`) and writes each sweep's heatmap
(`{sweep}.png`) and arrays (`{sweep}.npz`), `patching.json` and the console summary (each sweep's
`strongest` cell).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from tqdm.auto import tqdm

from jaxinterp.patching.sweeps import (
    DEFAULT_SWEEPS,
    DIRECTIONS,
    SWEEPS,
    PatchingError,
    PatchingResult,
    run_sweep,
)
from jaxinterp.runtime import distributed, files, inputs
from jaxinterp.tasks import Dataset
from jaxinterp.viz import plots


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
    raise inputs.InputError(f"--sweeps={config.sweeps}: unknown sweep(s) {', '.join(unknown)}; "
                            f"choose from {', '.join(SWEEPS)}")
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
      for name in tqdm(sweeps, desc="sweeps", disable=not distributed.is_writer()):
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
