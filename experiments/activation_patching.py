"""TransformerLens-style activation-patching sweeps as heatmaps (PNG) and arrays (.npz).

    python -m experiments.activation_patching                     # the bundled toy model, induction
    python -m experiments.activation_patching --model=DIR --task=ioi --data=ioi.csv --n_examples=16

For each sweep in `--sweeps` (default: resid_pre, attn_out, mlp_out by layer x position; head_out by
layer x head; head q/k/v/pattern by layer x head), every cell is patched in turn (vectorised with
`jax.vmap`, see `jaxinterp.patching`) and the task metric is recorded, normalised as
(m - m_corrupted) / (m_clean - m_corrupted). `--direction=noising` (default) runs the clean prompt
with one corrupted activation; `denoising` the reverse (TransformerLens' default).

Writes `{sweep}.png` and `{sweep}.npz` (arrays `normalized`, `metric`, `m_clean`, `m_corrupted`,
`axis_labels`, ...) under `--out`, `patching.json` with the baselines, and `DONE` last. The console,
the heatmaps and the files show the same normalised number; the heatmaps are white at no effect (1
when noising, 0 when denoising). Positions are labelled with the first prompt's tokens, decoded when
the model has a tokenizer. A finished run in `--out` is kept: the same settings report it complete,
other settings are refused unless `--overwrite`. The pipeline is
`jaxinterp.patching.pipeline.activation_patching`.
"""

from __future__ import annotations

from absl import app

from jaxinterp import patching
from jaxinterp.experiments import cli, common, dry_run, dry_run_methods
from jaxinterp.patching import pipeline
from jaxinterp.runtime import inputs

D = cli.defaults(pipeline.PatchingConfig)
OUT = "runs/activation_patching"
cli.define("string", "model", D["model"],
           "Model: 'toy' (the bundled induction model), an HF checkpoint dir or an orbax "
           "conversion.")
cli.define("string", "tokenizer", None, inputs.TOKENIZER_HELP)
cli.define("string", "task", D["task"], "Task name (see jaxinterp.tasks.task_names()).")
cli.define("string", "data", None, "Task CSV; optional for --task=induction (generated).")
cli.define("integer", "n_examples", D["n_examples"], "Examples to average over.")
cli.define("integer", "batch_size", D["batch_size"], "Examples per batch.")
cli.define("string", "out", OUT, "Output directory.")
cli.define("integer", "seed", D["seed"], "Seed for generated data.")
cli.define("string", "sweeps", D["sweeps"],
           f"Comma-separated sweeps, from: {', '.join(patching.SWEEPS)}.")
cli.define("string", "direction", D["direction"],
           "noising (clean run, corrupted activation) or denoising (corrupted run, clean "
           "activation).")
cli.define("integer", "patch_chunk", D["patch_chunk"],
           "Patched forwards per compiled vmap call (lower it to save memory).")
cli.define("bool", "skip_bad_rows", D["skip_bad_rows"], common.SKIP_BAD_ROWS_HELP)
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)
for _f in dry_run.FLAGS:  # --dry_run, --device_memory, --seq_len
  cli.define(*_f)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config(pipeline.PatchingConfig, mib_split=common.mib_split())
  if dry_run.requested():
    dry_run_methods.simple("patching", config.model, None, config.batch_size, sweeps=config.sweeps,
                   chunk=config.patch_chunk)
    return
  common.start_run()
  pipeline.activation_patching(config, cli.value("out", OUT),
                               overwrite=cli.value("overwrite", False))


if __name__ == "__main__":
  cli.run(main)
