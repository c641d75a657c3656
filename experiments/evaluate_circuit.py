"""Evaluate a circuit from a graph.json: faithfulness, the curve over edge counts, CPR/CMD, overlap.

    python -m experiments.evaluate_circuit --graph=runs/find_circuit/graph.json
    python -m experiments.evaluate_circuit --model=DIR --task=ioi --data=ioi.csv \\
        --graph=eap_ig_graph.json --compare=ours/graph.json --top_n=200

The graph may be one of ours or one written by the PyTorch EAP-IG (`Graph.to_json`); it must belong
to `--model` (same layers and heads). A graph.json from find_circuit records how its circuit was
found (`meta`: model and its hash, task, data, metric, BOS, ablation, seed, examples): those are the
defaults here, a flag given with another value is reported in a warning, and a model with other
weights than the recorded hash is refused unless `--force`. Under optimal ablation the constants
are the ones the circuit was found with (find_circuit's optimal_ablation/ beside the graph), unless
`--optimal_values` names others. Reports:

* the faithfulness of the circuit as stored (`in_graph`), or of the top `--top_n` edges by |score|
  (pruned) when `--top_n` is given: (m(C) - m(empty)) / (m(full) - m(empty));
* the faithfulness curve of top-n circuits at MIB's edge percentages (`faithfulness.csv`,
  `faithfulness.png`), ranked by |score|;
* MIB's CPR (signed ranking) and CMD (absolute ranking); with `--protocol=mib`, MIB's own
  `evaluate_area_under_curve` too (`evaluation.mib_protocol`: fractions .001 ... 1 of the scored
  edges, or nodes with `--mib_level=node`, weighted edge counts, area_under and area_from_1, with
  `--log_scale` and `--mib_absolute` as MIB's `log_scale` and `absolute`);
* with `--compare`, the edge and node IoU with a second circuit (the same `--top_n` re-selection is
  applied to it).

A position- or span-level graph.json (`find_circuit --level=position [--schema=...]`) is evaluated
at its level (`jaxinterp.evaluation.position_report`): the circuit as stored or re-selected with
`--top_n` from the positions.npz / spans.npz beside it, the curve at the sizes and ranking its meta
records (`curve_sizes`, `absolute`: with find_circuit's `--batch_size`, its faithfulness.csv rows),
CPR/CMD over its position (span) edges, and circuit.png/html for position graphs; `--protocol=mib`
and its options are refused there, and `--compare` takes a graph of the same level (edge IoU).

A task check (clean and corrupted metric, rows the model gets right, top-1 accuracy) runs first,
with the graph's --filter. Writes `evaluation.json`, `faithfulness.csv`, `faithfulness.png`,
`circuit.png` and `circuit.html` under `--out` (default: `evaluation/` beside --graph, never the
graph's own run directory), all after every number has been computed, each through a temp file
and a rename, and `DONE` last; an --out holding other outputs is refused unless --overwrite. The
pipeline is `jaxinterp.evaluation.report.evaluate_circuit`.
"""

from __future__ import annotations

from absl import app

from jaxinterp import tasks
from jaxinterp.attribution import INTERVENTIONS
from jaxinterp.evaluation import report
from jaxinterp.experiments import cli, common, dry_run, dry_run_methods
from jaxinterp.runtime import inputs

D, M = cli.defaults(report.EvaluateConfig), report.META_DEFAULTS
META = " Default: as --graph's meta records it (else the default shown)."
cli.define("string", "model", M["model"],
           "Model: 'toy' (the bundled induction model), an HF checkpoint dir or an orbax "
           "conversion." + META)
cli.define("string", "tokenizer", None, inputs.TOKENIZER_HELP)
cli.define("string", "graph", None, "graph.json to evaluate (ours or from the PyTorch EAP-IG).")
cli.define("string", "task", M["task"], "Task name (see jaxinterp.tasks.task_names())." + META)
cli.define("string", "data", None, "Task CSV; optional for --task=induction (generated)." + META)
cli.define("integer", "n_examples", M["n_examples"], "Examples to evaluate on." + META)
cli.define("integer", "batch_size", D["batch_size"], "Examples per batch.")
cli.define("string", "intervention", M["intervention"],
           f"How edges outside the circuit are ablated: one of {', '.join(INTERVENTIONS)}." + META)
cli.define("string", "optimal_values", None, "--intervention=optimal: the learned constants' "
           "directory. Default: those the graph was found with (its meta's optimal_values, or "
           "the optimal_ablation/ find_circuit saved beside it); trained here only without them.")
cli.define("integer", "top_n", None, "Re-select the top-n edges by |score| instead of in_graph "
           "(position and span graphs: ranked as their meta's `absolute`).")
cli.define("string", "compare", None,
           "A second graph.json to compare circuits with (edge/node IoU).")
cli.define("string", "out", None, "Output directory (default: evaluation/ beside --graph).")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)
cli.define("enum", "filter", M["filter"], common.FILTER_HELP + META,
           enum_values=["none", "correct"])
cli.define("integer", "seed", M["seed"], "Seed for generated data." + META)
cli.define("enum", "metric", M["metric"], "Per-example metric: 'task' (the task's default, the "
           "EAP-IG paper's choice), logit_diff, prob_diff, kl, js or cross-entropy." + META,
           enum_values=list(tasks.METRICS))
cli.define("bool", "prepend_bos", M["prepend_bos"], "Prepend BOS as TransformerLens does." + META)
cli.define("bool", "skip_bad_rows", M["skip_bad_rows"], common.SKIP_BAD_ROWS_HELP + META)
cli.define("bool", "force", D["force"], "Evaluate even with a model whose weights differ from "
           "the hash in graph.json's meta.")
cli.define("enum", "protocol", D["protocol"], "mib: also run MIB's evaluate_area_under_curve "
           "(circuits of 0.1% ... 100% of the scored items, pruned; weighted edge counts; CPR as "
           "area_under, CMD as area_from_1).", enum_values=["default", "mib"])
cli.define("enum", "mib_level", D["mib_level"], "--protocol=mib: rank edges, or nodes by the "
           "graph's node scores.", enum_values=["edge", "node"])
cli.define("bool", "log_scale", D["log_scale"], "--protocol=mib: areas over log(fraction), "
           "as MIB's log_scale.")
cli.define("bool", "mib_absolute", D["mib_absolute"], "--protocol=mib: rank by |score| "
           "(MIB's --absolute); else by signed importance, MIB's default.")


for _f in dry_run.FLAGS:  # --dry_run, --device_memory, --seq_len
  cli.define(*_f)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # The settings the meta records stay None unless given, so the meta's values apply.
  config = cli.config(report.EvaluateConfig, mib_split=common.mib_split(),
                      **{k: cli.FLAGS[k].value if cli.given(k) else None for k in M})
  if dry_run.requested():  # --model as given or the default: --graph is not read
    dry_run_methods.simple("circuit", cli.value("model", M["model"]), None, config.batch_size)
    return
  common.start_run()
  report.evaluate_circuit(config, cli.value("out", None), overwrite=cli.value("overwrite", False))


if __name__ == "__main__":
  cli.run(main)
