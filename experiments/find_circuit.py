"""Find a circuit: attribute every edge, select the top edges, evaluate faithfulness, plot.

    python -m experiments.find_circuit            # EAP-IG on the bundled induction model
    python -m experiments.find_circuit --model=/path/to/hf_dir --task=ioi --data=ioi.csv \\
        --method=EAP-IG-inputs --ig_steps=5 --top_n=200 --out=runs/ioi

Writes to --out: graph.json (EAP-IG format, every valid edge with its score in EAP-IG's sign; a
`meta` section records the provenance), scores.npz, faithfulness.csv, circuit.png and
faithfulness.png; with --mib_out, an MIB leaderboard folder too. Long runs (the exact
method, or more than --checkpoint_batches batches) checkpoint their partial scores to
--out/.resume with orbax and resume from there when rerun with the same flags. Before attributing,
a task check prints the clean and corrupted metric, the rows the model gets right and its top-1
accuracy (one warning line if it does not do the task; --filter=correct keeps the right rows). A
--out holding a finished run with other settings, or another binary's outputs, is refused unless
--overwrite; the same finished run is reported complete and left as it is.

Ends with the phase times, `phases: load 1.2 s, compile 8.0 s, attribute 10.1 s, curve 3.0 s,
write 0.1 s (total 22.4 s)`, also in graph.json's `meta["phase_seconds"]`
(`jaxinterp.runtime.timing`): "compile" is JAX's tracing, lowering and XLA compiling wherever it
happened, taken out of the other phases. meta's "write" counts every output but graph.json itself
(written last, holding the times).

The method's options (--ig_steps, --tau, --mask_steps, ...) are generated from the methods' options
dataclasses (`jaxinterp.discovery.flags`); one given to a method without that option is refused.
The run itself is `jaxinterp.discovery.find_circuit(config, out)`.
"""

from __future__ import annotations

from absl import app

from jaxinterp import attribution as A
from jaxinterp import tasks
from jaxinterp.discovery import FindCircuitConfig, find_circuit
from jaxinterp.discovery import flags as option_flags
from jaxinterp.experiments import cli, common, dry_run, dry_run_methods
from jaxinterp.runtime import inputs

DEFAULTS = cli.defaults(FindCircuitConfig)
METHOD_FLAGS = option_flags.method_flags()
OPTIMAL_FLAGS = option_flags.optimal_flags()


def _define(kind: str, name: str, help_text: str, **kw) -> None:
  cli.define(kind, name, DEFAULTS[name], help_text, **kw)


_define("string", "model", "HF checkpoint dir, orbax conversion dir, or 'toy'.")
_define("enum", "dtype", "Parameter dtype (default: the checkpoint's own; float32 upcasts a "
        "bf16 checkpoint).", enum_values=["float32", "bfloat16"])
_define("string", "tokenizer", inputs.TOKENIZER_HELP)
_define("string", "task", f"Task: one of {tasks.task_names()}.")
_define("string", "data", "CSV of clean/corrupted prompt pairs (not needed for induction), or a "
        "local copy of an MIB dataset (directory, .jsonl, .parquet).")
_define("enum", "metric", "Per-example metric: 'task' (the task's default, the EAP-IG paper's "
        "choice), logit_diff or prob_diff (as the paper defines them for the task), kl or js "
        "(divergence from the clean run), cross-entropy.", enum_values=list(tasks.METRICS))
_define("string", "method", "Attribution method: " + "; ".join(
    f"{m.name}: {m.description}" for m in A.METHODS.values()) + "; or an ensemble 'A+B' (e.g. "
    "EAP+EAP-IG-inputs): the mean of the members' rank-normalised scores.")
_define("integer", "bootstrap", "Bootstrap B resamples of the batches: per score its std and the "
        "fraction of resamples keeping its sign (scores.npz; a summary in graph.json meta). "
        "Resamples batches: a small --batch_size resamples finer.")
_define("integer", "n_examples", "Number of examples.")
_define("integer", "batch_size", "Examples per compiled call.")
_define("enum", "intervention", "How ablated edges are valued; 'optimal': per node the constant "
        "that minimises the loss when the node is ablated (optimal ablation, trained first, saved "
        "to --out/optimal_ablation; see the --oa_* flags).", enum_values=list(A.INTERVENTIONS))
_define("string", "optimal_values", "--intervention=optimal: load the constants from this "
        "directory (an earlier run's --out/optimal_ablation) instead of training them.")
_define("integer", "top_n", "Edges (--level's items) in the selected circuit, before pruning "
        "(default 20, or the method's own circuit: edge-pruning's, ACDC's).")
_define("enum", "curve_sizes", "The faithfulness curve's circuit sizes: counts (0, 1, 2, 5, 10, "
        "20, 50, ... edges) or mib (MIB's ten percentages of all edges, 0.1% to 100%); --top_n's "
        "size is added.", enum_values=["counts", "mib"])
_define("enum", "selection", "Circuit selection.", enum_values=["top_n", "greedy"])
_define("bool", "absolute", "Rank edges by |score| (else signed score).")
_define("bool", "prepend_bos", "Prepend BOS as TransformerLens does.")
_define("integer", "seed", "Seed for generated data, the bootstrap and mask training (recorded in "
        "graph.json meta).")
cli.define("string", "out", "runs/find_circuit", "Output directory.")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)
_define("enum", "filter", common.FILTER_HELP, enum_values=["none", "correct"])
_define("integer", "checkpoint_batches", "Checkpoint after every batch when a run has more "
        "batches than this (the exact method always checkpoints).")
_define("string", "mesh", "Device mesh DATAxMODEL, e.g. 2x4: batches split over DATA devices, "
        "heads and MLP columns over MODEL devices (jax.sharding). Multi-host: call "
        "jax.distributed.initialize() first (see jaxinterp/runtime/sharding.py).")
_define("bool", "fsdp", "With --mesh: also split each weight matrix over the DATA devices "
        "(FSDP-style; each device holds 1/(DATA*MODEL) of it; same scores).")
_define("bool", "skip_bad_rows", common.SKIP_BAD_ROWS_HELP)
_define("string", "mib_out", "Also write the edge scores as an MIB leaderboard submission: "
        "DIR/{task}_{model}/ (see --mib_format).")
_define("enum", "mib_format", "importances: one importances.json of every edge's score; "
        "circuits: nine binary circuits circuit_{p}.json of at most p% of the edges (ranked as "
        "--absolute says).", enum_values=["importances", "circuits"])
_define("string", "mib_model", "The model's name in the --mib_out folder (MIB's: gpt2, qwen2.5, "
        "gemma2, llama3); default the --model directory's name.")
_define("string", "schema", "--level=position: a circuit of span edges over this schema's spans "
        "(induction or ioi; jaxinterp.discovery.spans): spans.npz, graph.json of span edges.")
_define("string", "span_aggregation", "--schema: aggregate each row's position scores over a "
        "span by sum, mean or max_abs (the value of largest |.|, sign kept; default sum).")
for _f in dry_run.FLAGS:  # --dry_run, --device_memory, --seq_len
  cli.define(*_f)
for _flag in METHOD_FLAGS + OPTIMAL_FLAGS:  # --level, --remat, --ig_steps, --tau, --oa_steps, ...
  cli.define(_flag.kind, _flag.name, None, _flag.help,
             **({"enum_values": list(_flag.choices)} if _flag.choices else {}))


def _given(option_flags_: list) -> dict:
  """{name: value} of the generated flags that were given."""
  return {f.name: cli.value(f.name, None) for f in option_flags_
          if cli.value(f.name, None) is not None}


def config() -> FindCircuitConfig:
  """The run's config from the flags."""
  return cli.config(FindCircuitConfig, options=_given(METHOD_FLAGS),
                    optimal=_given(OPTIMAL_FLAGS))


def run(argv=None) -> dict:
  """Run with the current flags; returns the summary dict (`discovery.find_circuit`'s), or with
  --dry_run prints the memory plan and returns it."""
  if dry_run.requested():
    c = config()
    return dry_run_methods.find_circuit(c.model, c.dtype, c.method, c.options, c.batch_size, c.mesh)
  common.start_run()
  return find_circuit(config(), cli.value("out", "runs/find_circuit"),
                      overwrite=cli.value("overwrite", False))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run()


if __name__ == "__main__":
  cli.run(main)
