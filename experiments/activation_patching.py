"""TransformerLens-style activation-patching sweeps as heatmaps (PNG) and arrays (.npz).

    python -m experiments.activation_patching                     # the bundled toy model, induction
    python -m experiments.activation_patching --model=DIR --task=ioi --data=ioi.csv --n_examples=16

For each sweep in `--sweeps` (default: resid_pre, attn_out, mlp_out by layer x position; head_out by
layer x head; head q/k/v/pattern by layer x head), every cell is patched in turn (vectorised with
`jax.vmap`, see `jaxinterp.patching`) and the task metric is recorded, normalised as
(m - m_corrupted) / (m_clean - m_corrupted). `--direction=noising` (default) runs the clean prompt with
one corrupted activation; `denoising` the reverse (TransformerLens' default).

Writes `{sweep}.png` and `{sweep}.npz` (arrays `normalized`, `metric`, `m_clean`, `m_corrupted`,
`axis_labels`, ...) under `--out`, `patching.json` with the baselines, and `DONE` last. Heatmaps show
the change each patch makes, centred on zero (white: no effect); positions are labelled with the
first prompt's tokens, decoded when the model has a tokenizer.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging
from tqdm.auto import tqdm

from jaxinterp.experiments import cli, common
from jaxinterp.runtime import files
from jaxinterp import patching
from jaxinterp.viz import plots

DEFAULTS = dict(model="toy", task="induction", data=None, n_examples=16, batch_size=16,
                out="runs/activation_patching", seed=0, sweeps=",".join(patching.DEFAULT_SWEEPS),
                direction="noising", patch_chunk=32, skip_bad_rows=False)

cli.define("string", "model", DEFAULTS["model"],
           "Model: 'toy' (the bundled induction model), an HF checkpoint dir or an orbax conversion.")
cli.define("string", "task", DEFAULTS["task"], "Task name (see jaxinterp.tasks.task_names()).")
cli.define("string", "data", None, "Task CSV; optional for --task=induction (generated).")
cli.define("integer", "n_examples", DEFAULTS["n_examples"], "Examples to average over.")
cli.define("integer", "batch_size", DEFAULTS["batch_size"], "Examples per batch.")
cli.define("string", "out", DEFAULTS["out"], "Output directory.")
cli.define("integer", "seed", DEFAULTS["seed"], "Seed for generated data.")
cli.define("string", "sweeps", DEFAULTS["sweeps"],
           f"Comma-separated sweeps, from: {', '.join(patching.SWEEPS)}.")
cli.define("string", "direction", DEFAULTS["direction"],
           "noising (clean run, corrupted activation) or denoising (corrupted run, clean activation).")
cli.define("integer", "patch_chunk", DEFAULTS["patch_chunk"],
           "Patched forwards per compiled vmap call (lower it to save memory).")
cli.define("bool", "skip_bad_rows", DEFAULTS["skip_bad_rows"], common.SKIP_BAD_ROWS_HELP)

FLAGS = flags.FLAGS


def _flag(name):
  return cli.value(name, DEFAULTS[name])


def _position_labels(dataset, tokenizer=None) -> list[str]:
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  sweeps = [s.strip() for s in _flag("sweeps").split(",") if s.strip()]
  if not sweeps:
    raise app.UsageError("--sweeps is empty")
  unknown = [s for s in sweeps if s not in patching.SWEEPS]
  if unknown:
    raise app.UsageError(f"unknown sweep(s) {unknown}; choose from {', '.join(patching.SWEEPS)}")
  direction = _flag("direction")
  if direction not in patching.DIRECTIONS:
    raise app.UsageError(f"--direction={direction}: choose from {', '.join(patching.DIRECTIONS)}")
  batch_size = common.positive("batch_size", _flag("batch_size"))
  chunk, out = common.positive("patch_chunk", _flag("patch_chunk")), _flag("out")
  common.positive("n_examples", _flag("n_examples"))

  with common.run_dir(out) as held:
    model_name = _flag("model")
    model = common.load_model(model_name)
    dataset = common.load_dataset(model, model_name, _flag("task"), _flag("data"),
                                  _flag("n_examples"), seed=_flag("seed"),
                                  skip_bad_rows=_flag("skip_bad_rows"))
    results = {}
    try:
      for name in tqdm(sweeps, desc="sweeps"):
        results[name] = patching.run_sweep(model.cfg, model.params, dataset, name,
                                           direction=direction, batch_size=batch_size, chunk=chunk)
    except patching.PatchingError as e:
      raise app.UsageError(str(e)) from None

    pos_labels = _position_labels(dataset, model.tokenizer)
    outputs = [f"{n}.{ext}" for n in results for ext in ("npz", "png")] + ["patching.json"]
    with held.writing(outputs):
      for name, r in results.items():
        files.atomic_savez(os.path.join(out, f"{name}.npz"), **r.to_npz_dict())
        plots.plot_patching(r, os.path.join(out, f"{name}.png"), title=dataset.task.name,
                            position_labels=pos_labels)
      first = next(iter(results.values()))
      files.atomic_write_json(os.path.join(out, "patching.json"), {
          "model": model.path, "task": dataset.task.name, "data": dataset.source,
          "n_examples": len(dataset), "direction": direction, "m_clean": first.m_clean,
          "m_corrupted": first.m_corrupted, "positions": pos_labels,
          "sweeps": {n: {"site": r.sweep.site, "axes": list(r.axis_labels),
                         "shape": list(r.normalized.shape)} for n, r in results.items()}})

  print(f"{dataset.task.name} on {len(dataset)} examples ({direction}): clean metric "
        f"{first.m_clean:.4f}, corrupted {first.m_corrupted:.4f}")
  neutral = 1.0 if direction == "noising" else 0.0  # the value of a cell that does not matter
  for name, r in results.items():
    v = r.normalized
    idx = np.unravel_index(int(np.argmax(np.abs(v - neutral))), v.shape)
    cell = ", ".join(f"{lab} {int(i)}" for lab, i in zip(r.axis_labels, idx))
    if abs(v[idx] - neutral) < 1e-3:
      print(f"  {name:16s} {str(v.shape):14s} no cell has an effect")
    else:
      print(f"  {name:16s} {str(v.shape):14s} strongest cell: {cell} -> {v[idx]:+.3f}")
  print(f"wrote {len(results)} heatmaps and .npz files to {out}")
  logging.info("patching results written to %s", out)


if __name__ == "__main__":
  cli.run(main)
