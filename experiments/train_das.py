r"""Causal abstraction with DAS on a toy model whose intermediate variable is known.

Task: the input is `a b =` (a, b in 0..p-1, `=` is token p) and the model predicts S = (a + b) mod p
at `=`. The high-level causal model is `S := (a + b) mod p; O := S`. Interchanging S between a base
and a source input gives the counterfactual label S(source).

Ground truth by construction: the model has 2 layers and the attention of layer 1 is cut (its output
weights are held at zero while training), so the only path from the operands to the answer is layer
0's attention into position 2. Hence everything the answer depends on sits in the residual stream at
`=` after layer 0 (`blocks.1.hook_resid_pre`, position 2): DAS for S must succeed there and at the
final residual at `=`, and fail (IIA near chance 1/p) at positions 0 and 1 (no path to the answer
after layer 0; before it they hold a single operand) and at the embeddings.

The script (1) trains the tiny model with optax on all p^2 inputs (or loads it from --model_dir if
it is already there), shipping it via `models.save_converted`; (2) trains a DAS rotation
(`RotatedSpace`, QR parametrisation, k rotated dims) at each residual-stream layer x position,
evaluates IIA on held-out pairs and writes a heatmap PNG plus JSON/CSV; (3) runs the
subspace-illusion diagnostic for a 1-d direction learned at the layer-0 MLP neurons. The pipeline is
`jaxinterp.interventions.toy_task.train_das`.

  python -m experiments.train_das                   # ~1 min on CPU
  python -m experiments.train_das --retrain_model   # retrain and overwrite the shipped model

It runs as N processes of one program (`--coordinator_address`, `--num_processes`,
`--process_id`; docs/performance.md, "Multi-host"): process p trains the DAS sites p, p + N, ...,
every process gets all the results (one process's, bitwise) and process 0 writes them.
"""

from __future__ import annotations

from absl import app

from jaxinterp.experiments import cli, common, dry_run, dry_run_methods
from jaxinterp.interventions import toy_task

D = cli.defaults(toy_task.DASConfig)
OUT = "runs/das"
cli.define("string", "model_dir", D["model_dir"],
           "Where the toy model lives (trained there if absent).")
cli.define("bool", "retrain_model", D["retrain_model"],
           "Retrain the toy model even if --model_dir has one.")
cli.define("string", "out", OUT, "Output directory for IIA results and trained interventions.")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)
cli.define("string", "png", D["png"], "Heatmap PNG path (default: --out/das_iia.png).")
cli.define("integer", "p", D["p"], "Modulus of the toy task.")
cli.define("integer", "model_steps", D["model_steps"], "Optimiser steps for the toy model.")
cli.define("float", "model_lr", D["model_lr"], "Learning rate (AdamW) for the toy model.")
cli.define("integer", "k", D["k"], "Interchanged rotated dimensions for DAS.")
cli.define("integer", "das_steps", D["das_steps"], "DAS optimiser steps per site.")
cli.define("integer", "n_train", D["n_train"], "Training pairs for DAS.")
cli.define("integer", "n_eval", D["n_eval"], "Held-out pairs for IIA.")
cli.define("integer", "seed", D["seed"], "Random seed.")


for _f in dry_run.FLAGS:  # --dry_run, --device_memory, --seq_len
  cli.define(*_f)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config(toy_task.DASConfig)
  if dry_run.requested():  # the toy model's training step, on all p^2 inputs at once
    dry_run_methods.simple("train", config.model_dir, None, config.p ** 2)
    return
  common.start_run()
  toy_task.train_das(config, cli.value("out", OUT), overwrite=cli.value("overwrite", False))


if __name__ == "__main__":
  cli.run(main)
