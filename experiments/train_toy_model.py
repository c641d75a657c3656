r"""Train the bundled toy model: a 2-layer GPT-2-style transformer that forms induction heads.

The model is trained with optax on rows `BOS u.. r_1..r_n w.. r_1..r_n v..` of distinct random
tokens in which a block `r` of random length n <= --seq_len repeats after a random prefix `u` and a
random gap `w` (filler `v` completes the row), with the next-token cross-entropy on the second copy
only. Because the position of the repeat and the distance between the copies vary, no positional
shortcut works and the model learns the textbook circuit: a previous-token head in layer 0 whose
output the induction head in layer 1 reads through its keys (K-composition). By default the MLPs are
frozen at zero (`--attn_only`), the position embeddings start from a sinusoidal basis (so relative
offsets are easy to learn) and a group-lasso penalty on the heads' output matrices (`--head_l1`)
keeps few heads active.

After training, the script finds the previous-token head (layer 0, attention to position p-1) and
the induction head (layer 1, attention to the token after the previous occurrence of the current
token); where several heads do the same job, it records the one whose zero-ablation raises the
induction loss most. It writes the checkpoint (`models.save_converted`) and `toy_metadata.json`
(flags, final loss/accuracy, per-head scores, the two head indices) to --out, then `DONE`:

  python -m experiments.train_toy_model --out=runs/toy_model
  python -m experiments.find_circuit --model=runs/toy_model   # then use it like the bundled one

The bundled model (`jaxinterp/assets/toy/`) is only overwritten with `--overwrite_bundled`. The
pipeline is `jaxinterp.groundtruth.toy_training.train_toy_model`.
"""

from __future__ import annotations

from absl import app

from jaxinterp.experiments import cli, common
from jaxinterp.groundtruth import toy_training

D = cli.defaults(toy_training.ToyTrainConfig)
OUT = "runs/toy_model"
cli.define("string", "out", OUT, "Output directory for the checkpoint and metadata "
           "(not the bundled model's directory, unless --overwrite_bundled).")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)
cli.define("bool", "overwrite_bundled", D["overwrite_bundled"], "Allow --out to be the bundled "
           "model's directory (jaxinterp/assets/toy), replacing the model the README's numbers "
           "come from.")
cli.define("integer", "steps", D["steps"], "Optimizer steps.")
cli.define("integer", "seed", D["seed"], "Seed for the initialisation and the data.")
cli.define("integer", "seq_len", D["seq_len"],
           "Longest repeated block n; rows are 1 + 2*seq_len tokens.")
cli.define("integer", "min_seq_len", D["min_seq_len"], "Shortest repeated block n.")
cli.define("integer", "eval_block_len", D["eval_block_len"], "Block length recorded as the "
           "default of `jaxinterp.groundtruth.toy.induction_dataset`.")
cli.define("integer", "batch_size", D["batch_size"], "Rows per step.")
cli.define("float", "lr", D["lr"], "Peak learning rate (linear warmup, cosine decay).")
cli.define("float", "weight_decay", D["weight_decay"], "AdamW weight decay.")
cli.define("integer", "n_tokens", D["n_tokens"], "Number of content tokens; BOS is id n_tokens.")
cli.define("integer", "n_layers", D["n_layers"], "Layers.")
cli.define("integer", "n_heads", D["n_heads"], "Heads per layer.")
cli.define("integer", "d_model", D["d_model"], "Residual width.")
cli.define("integer", "d_head", D["d_head"], "Head width; wide heads can copy the whole "
           "vocabulary alone, which keeps the circuit from spreading over many heads. 0 means "
           "d_model // n_heads.")
cli.define("integer", "d_mlp", D["d_mlp"], "MLP width.")
cli.define("integer", "n_ctx", D["n_ctx"], "Context length (learned positions).")
cli.define("bool", "attn_only", D["attn_only"],
           "Freeze the MLPs at exactly zero (an attention-only model).")
cli.define("enum", "pos_init", D["pos_init"], "Initialisation of the (learned) position "
           "embeddings: a sinusoidal basis scaled to the token embeddings' norm (relative offsets "
           "such as 'previous token' are then easy to learn), or normal(0.02).",
           enum_values=["sinusoidal", "normal"])
cli.define("float", "head_l1", D["head_l1"], "Group-lasso weight on each head's output matrix "
           "norm ||W_O[h]||_F, which favours a sparse circuit (few heads with large outputs).")
cli.define("integer", "log_every", D["log_every"], "Steps between progress-bar loss updates.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.config(toy_training.ToyTrainConfig)
  common.start_run()
  toy_training.train_toy_model(config, cli.value("out", OUT),
                               overwrite=cli.value("overwrite", False))


if __name__ == "__main__":
  cli.run(main)
