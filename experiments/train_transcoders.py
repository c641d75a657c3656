"""Train per-layer transcoders (PLTs) on a model's own activations, in circuit-tracer's format.

    python -m experiments.train_transcoders                     # the bundled toy_mlp, in seconds
    python -m experiments.train_transcoders --model=/path/to/hf_dir --features=512 --steps=3000 \\
        --out=runs/transcoders
    python -m experiments.attribution_graph --model=/path/to/hf_dir \\
        --transcoders=runs/transcoders --prompt="..."              # then use them

Each layer's transcoder reads the MLP's input (`mlp.hook_in`, after the norm) and writes its output
(`hook_mlp_out`), with ReLU features and an L1 penalty weighted by the decoder norms, or JumpReLU
features and an L0 penalty (`--activation`), trained with Adam (optax). The tokens are text the
model samples itself after BOS (the default: --rows rows of --seq_len tokens at --temperature), or
a file: --token_ids (a .npy [rows, pos] array, or one row of ids per line) or --text (each line a
document; needs a tokenizer: the model's tokenizer.json or --tokenizer). --heldout of the rows are
kept out of training.

Writes to --out: config.yaml and layer_{l}.safetensors (circuit-tracer's transcoder set, which
`jaxinterp.transcoders.load`, `experiments.attribution_graph --transcoders=` and circuit-tracer
read), training.json (settings, and per layer the fraction of variance explained and L0, on the
training and the held-out tokens), run.json and DONE; progress bars while it samples and trains,
then a per-layer table. A finished --out is kept: the same settings report it complete, other
settings are refused unless --overwrite. Bad input is one line and leaves no output directory.

The run is `jaxinterp.transcoders.training_run.train_transcoder_set(config, out)`.
"""

from __future__ import annotations

from absl import app

from jaxinterp.experiments import cli, common
from jaxinterp.runtime import inputs
from jaxinterp.transcoders.training_run import TrainTranscodersConfig, train_transcoder_set

DEFAULTS = cli.defaults(TrainTranscodersConfig)
OUT = "runs/transcoders"


def _define(kind: str, name: str, help_text: str, **kw) -> None:
  cli.define(kind, name, DEFAULTS[name], help_text, **kw)


_define("string", "model", "HF checkpoint dir, orbax conversion dir, or 'toy_mlp' (the bundled "
        "model with MLPs).")
_define("string", "tokenizer", inputs.TOKENIZER_HELP + " Read with --text only.")
_define("string", "text", "A text file to train on: each non-empty line a document, cut into "
        "rows of --seq_len tokens, BOS first (default: text the model samples).")
_define("string", "token_ids", "A file of token ids to train on: a .npy [rows, pos] integer "
        "array, or one row of ids separated by spaces per line; BOS is prepended where missing.")
_define("integer", "rows", "Rows the model samples (without --text and --token_ids).")
_define("integer", "seq_len", "Tokens per sampled or --text row, BOS included; 0: the model's "
        "context, at most 128.")
_define("float", "temperature", "Sampling temperature; 0 samples greedily.")
_define("float", "heldout", "Share of the rows kept out of training; FVE and L0 are reported on "
        "them too. In [0, 1).")
_define("enum", "activation", "relu (L1 penalty weighted by decoder norms) or jumprelu (L0 "
        "penalty, straight-through estimator).", enum_values=["relu", "jumprelu"])
_define("integer", "features", "Transcoder features per layer.")
_define("float", "sparsity", "Coefficient of the sparsity penalty (L1 or L0).")
_define("bool", "skip", "Also learn a linear skip connection per layer.")
_define("integer", "steps", "Adam steps.")
_define("float", "lr", "Adam's learning rate.")
_define("integer", "batch_size", "Tokens per training step.")
_define("integer", "seed", "Seed of the sampling, the held-out split and the training.")
_define("enum", "dtype", "The model's dtype while activations are collected, and the saved "
        "transcoders' (training is float32).", enum_values=["float32", "bfloat16"])
cli.define("string", "out", OUT, "Output directory.")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)


def run(argv=None) -> dict:
  """Run with the current flags; returns the report (training.json's contents)."""
  common.start_run()
  return train_transcoder_set(cli.config(TrainTranscodersConfig), cli.value("out", OUT),
                              overwrite=cli.value("overwrite", False))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run()


if __name__ == "__main__":
  cli.run(main)
