"""Build the attribution graph of a prompt over transcoder features, as circuit-tracer does.

    python -m experiments.attribution_graph       # the bundled toy_mlp model and its transcoders
    python -m experiments.attribution_graph --model=/path/to/hf_dir \\
        --transcoders=/path/to/config.yaml --prompt="The capital of France is" --out=runs/graph

The prompt gets BOS prepended (circuit-tracer's `ensure_tokenized`); a model without a tokenizer
(the toy models) takes token ids separated by spaces. The default, the bundled induction model with
MLPs (jaxinterp/assets/toy_mlp) and its 128-feature ReLU transcoders per layer
(jaxinterp/assets/toy_transcoders; `jaxinterp.transcoders.toy` trains both), runs offline in
seconds on the prompt "5 3 17 42 8 25 61 9 3 17 42", whose top logit is the induction answer 8.

Writes to --out: graph.npz (the dense, unpruned graph in circuit-tracer's node order: selected
features, errors layer-major, tokens, logits), graph.json (the pruned graph in circuit-tracer's
frontend schema, which its local server and Neuronpedia open, with graph-metadata.json beside it)
and DONE; a progress bar while the rows are computed, then the graph scores and the phase times.
Bad input (an empty prompt, a prompt longer than the context, transcoders for another model, a
threshold outside (0, 1], ...) is one line and leaves no output directory behind.

Several processes (--coordinator_address, --num_processes, --process_id) split the batches of rows
and write the graph one process writes, bitwise; process 0 alone writes --out and prints the report
(docs/transcoders.md, "Several processes").

The run is `jaxinterp.transcoders.pipeline.attribution_graph(config, out)`.
"""

from __future__ import annotations

from absl import app

from jaxinterp.experiments import cli, common, dry_run
from jaxinterp.transcoders.pipeline import AttributionGraphConfig, attribution_graph

DEFAULTS = cli.defaults(AttributionGraphConfig)


def _define(kind: str, name: str, help_text: str, **kw) -> None:
  cli.define(kind, name, DEFAULTS[name], help_text, **kw)


_define("string", "model", "HF checkpoint dir, orbax conversion dir, 'toy_mlp' (the bundled "
        "model with MLPs) or 'toy'.")
_define("string", "transcoders", "circuit-tracer's transcoder config.yaml (or its directory); "
        "default: the bundled toy_mlp's transcoders (with --model=toy_mlp).")
_define("string", "prompt", "The prompt (BOS is prepended); for a model without a tokenizer, "
        "token ids separated by spaces.")
_define("integer", "max_n_logits", "At most this many logit targets.")
_define("float", "desired_logit_prob", "Logit targets until their cumulative probability reaches "
        "this, in (0, 1].")
_define("integer", "max_feature_nodes", "Keep at most this many features, the most influential "
        "(default: every active feature).")
_define("float", "node_threshold", "graph.json's pruning: the share of influence the kept nodes "
        "carry, in (0, 1].")
_define("float", "edge_threshold", "graph.json's pruning: the share of influence the kept edges "
        "carry, in (0, 1].")
_define("integer", "batch_size", "Rows per batch of VJPs.")
_define("enum", "dtype", "Model and transcoder dtype.", enum_values=["float32", "bfloat16"])
cli.define("string", "out", "runs/attribution_graph", "Output directory.")
for _f in dry_run.FLAGS:  # --dry_run, --device_memory, --seq_len (the prompt's tokens)
  cli.define(*_f)
cli.define("integer", "transcoder_features", 16384, "--dry_run: features per layer of the "
           "transcoders planned for.")


def config() -> AttributionGraphConfig:
  """The run's config from the flags."""
  return cli.config(AttributionGraphConfig)


def run(argv=None) -> dict:
  """Run with the current flags; returns `attribution_graph`'s summary (with --dry_run, prints
  the memory plan and returns it)."""
  if dry_run.requested():
    c = config()
    return dry_run.attribution_graph(c.model, c.dtype, c.batch_size,
                                     cli.value("transcoder_features", 16384),
                                     c.max_feature_nodes, c.max_n_logits)
  common.start_run()
  return attribution_graph(config(), cli.value("out", "runs/attribution_graph"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run()


if __name__ == "__main__":
  cli.run(main)
