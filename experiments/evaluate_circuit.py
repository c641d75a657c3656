"""Evaluate a circuit from a graph.json: faithfulness, the curve over edge counts, CPR/CMD, overlap.

    python -m experiments.evaluate_circuit --graph=runs/find_circuit/graph.json
    python -m experiments.evaluate_circuit --model=DIR --task=ioi --data=ioi.csv \\
        --graph=eap_ig_graph.json --compare=ours/graph.json --top_n=200

The graph may be one of ours or one written by the PyTorch EAP-IG (`Graph.to_json`); it must belong to
`--model` (same layers and heads). A graph.json from find_circuit records how its circuit was found
(`meta`: model and its hash, task, data, metric, BOS, ablation, seed, examples): those are the
defaults here, a flag given with another value is reported in a warning, and a model with other
weights than the recorded hash is refused unless `--force`. Reports:

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

Writes `evaluation.json`, `faithfulness.csv`, `faithfulness.png`, `circuit.png` and `circuit.html`
under `--out`, all after every number has been computed, each through a temp file and a rename, and
`DONE` last.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import app, flags, logging

from jaxinterp.experiments import cli, common
from jaxinterp.runtime import inputs
from jaxinterp.runtime import files
from jaxinterp import tasks
from jaxinterp.evaluation import faithfulness as evaluation
from jaxinterp import circuits as G
from jaxinterp.viz import plots
from jaxinterp.viz import viewer
from jaxinterp.attribution import INTERVENTIONS, AttributionError, make_ablation

DEFAULTS = dict(model="toy", graph=None, task="induction", data=None, n_examples=64, batch_size=16,
                intervention="patching", top_n=None, compare=None, out="runs/evaluate_circuit",
                seed=0, metric="task", prepend_bos=True, skip_bad_rows=False, force=False,
                protocol="default", mib_level="edge", log_scale=False, mib_absolute=False)
# Flags whose default is read from graph.json's meta (how the circuit was found).
FROM_META = ("model", "task", "data", "metric", "prepend_bos", "intervention", "seed", "n_examples",
             "skip_bad_rows")
DATA_FLAGS = ("task", "data", "prepend_bos", "seed", "n_examples", "skip_bad_rows")
OUTPUTS = ("evaluation.json", "faithfulness.csv", "faithfulness.png", "circuit.png", "circuit.html")

META = " Default: as --graph's meta records it (else the default shown)."
cli.define("string", "model", DEFAULTS["model"],
           "Model: 'toy' (the bundled induction model), an HF checkpoint dir or an orbax "
           "conversion." + META)
cli.define("string", "graph", None, "graph.json to evaluate (ours or from the PyTorch EAP-IG).")
cli.define("string", "task", DEFAULTS["task"],
           "Task name (see jaxinterp.tasks.task_names())." + META)
cli.define("string", "data", None, "Task CSV; optional for --task=induction (generated)." + META)
cli.define("integer", "n_examples", DEFAULTS["n_examples"], "Examples to evaluate on." + META)
cli.define("integer", "batch_size", DEFAULTS["batch_size"], "Examples per batch.")
cli.define("string", "intervention", DEFAULTS["intervention"],
           f"How edges outside the circuit are ablated: one of {', '.join(INTERVENTIONS)}." + META)
cli.define("integer", "top_n", None, "Re-select the top-n edges by |score| instead of in_graph.")
cli.define("string", "compare", None, "A second graph.json to compare circuits with (edge/node IoU).")
cli.define("string", "out", DEFAULTS["out"], "Output directory.")
cli.define("integer", "seed", DEFAULTS["seed"], "Seed for generated data." + META)
cli.define("enum", "metric", DEFAULTS["metric"], "Per-example metric: 'task' (the task's default, the "
           "EAP-IG paper's choice), logit_diff, prob_diff, kl, js or cross-entropy." + META,
           enum_values=list(tasks.METRICS))
cli.define("bool", "prepend_bos", DEFAULTS["prepend_bos"],
           "Prepend BOS as TransformerLens does." + META)
cli.define("bool", "skip_bad_rows", DEFAULTS["skip_bad_rows"], common.SKIP_BAD_ROWS_HELP + META)
cli.define("bool", "force", DEFAULTS["force"], "Evaluate even with a model whose weights differ from "
           "the hash in graph.json's meta.")
cli.define("enum", "protocol", DEFAULTS["protocol"], "mib: also run MIB's evaluate_area_under_curve "
           "(circuits of 0.1% ... 100% of the scored items, pruned; weighted edge counts; CPR as "
           "area_under, CMD as area_from_1).", enum_values=["default", "mib"])
cli.define("enum", "mib_level", DEFAULTS["mib_level"], "--protocol=mib: rank edges, or nodes by the "
           "graph's node scores.", enum_values=["edge", "node"])
cli.define("bool", "log_scale", DEFAULTS["log_scale"], "--protocol=mib: areas over log(fraction), "
           "as MIB's log_scale.")
cli.define("bool", "mib_absolute", DEFAULTS["mib_absolute"], "--protocol=mib: rank by |score| "
           "(MIB's --absolute); else by signed importance, MIB's default.")

FLAGS = flags.FLAGS


def _flag(name):
  return cli.value(name, DEFAULTS[name])


def _load_graph(path: str, cfg, what: str) -> G.Graph:
  """The graph file `main` has checked exists; a usage error naming `what` if it cannot be read."""
  try:
    return G.Graph.from_json(path, cfg=cfg)
  except G.GraphError as e:
    raise app.UsageError(f"{what}: {e}") from None


def _select(g: G.Graph, top_n):
  if top_n is None:
    return g
  try:
    return g.top_n(top_n, absolute=True)
  except G.GraphError as e:
    raise app.UsageError(f"--top_n: {e}") from None


def evaluate(model, graph: G.Graph, dataset, *, intervention: str, batch_size: int, top_n=None,
             compare: G.Graph | None = None) -> tuple[dict, evaluation.FaithfulnessCurve, G.Graph]:
  """All numbers of the report: (summary dict, the |score| faithfulness curve, the circuit).

  The full model, the empty circuit, the circuit itself and the top-n circuits of both curves (|score|
  ranking for the curve and CMD, signed ranking for CPR) are evaluated in one `evaluate_circuits`
  call (vmapped chunks of one compiled shape).
  """
  cfg, params = model.cfg, model.params
  circuit = _select(graph, top_n)
  pcts = list(G.MIB_PERCENTAGES)
  sizes = [G.n_edges_at_percentage(p, graph.n_edges) for p in pcts]
  by_abs = [graph.top_n(n, absolute=True) for n in sizes]
  by_signed = [graph.top_n(n, absolute=False) for n in sizes]
  circuits = [graph.full(), graph.empty(), circuit] + by_abs + by_signed
  weights = np.stack([c.edge_weights() for c in circuits])
  ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
  metric = np.atleast_1d(evaluation.evaluate_circuits(cfg, params, dataset, weights,
                                                      batch_size=batch_size, ablation=ablation))
  m_full, m_empty, m_circuit = (float(x) for x in metric[:3])
  if m_full == m_empty:
    raise AttributionError("the full model and the empty circuit give the same metric, so "
                           "faithfulness is undefined for this data and intervention")
  k = len(sizes)
  m_abs, m_signed = metric[3:3 + k], metric[3 + k:]
  f_abs = (m_abs - m_empty) / (m_full - m_empty)
  f_signed = (m_signed - m_empty) / (m_full - m_empty)
  curve = evaluation.FaithfulnessCurve(
      n_edges=np.asarray(sizes), n_edges_kept=np.asarray([c.count_edges() for c in by_abs]),
      percentages=np.asarray(pcts, np.float64), metric=m_abs, faithfulness=f_abs, m_full=m_full,
      m_empty=m_empty)
  summary = {
      "model": model.path, "task": dataset.task.name, "data": dataset.source,
      "n_examples": len(dataset), "intervention": intervention,
      "selection": "in_graph" if top_n is None else f"top_n={top_n} (|score|, pruned)",
      "n_edges_total": graph.n_edges, "n_edges": circuit.count_edges(),
      "n_nodes": circuit.count_nodes(),
      "metric_circuit": m_circuit, "metric_full": m_full, "metric_empty": m_empty,
      "faithfulness": G.normalized_faithfulness(m_circuit, m_full, m_empty),
      "CPR": G.cpr(pcts, f_signed), "CMD": G.cmd(pcts, f_abs),
      "curve": curve.rows(),
  }
  if compare is not None:
    other = _select(compare, top_n)
    summary["compare"] = {"n_edges": other.count_edges(), "n_nodes": other.count_nodes(),
                          "edge_iou": G.edge_iou(circuit, other),
                          "node_iou": G.node_iou(circuit, other)}
  return summary, curve, circuit


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  batch_size, top_n = common.positive("batch_size", _flag("batch_size")), _flag("top_n")
  if top_n is not None:
    common.positive("top_n", top_n, 0)
  graph_path, compare_path, out = _flag("graph"), _flag("compare"), _flag("out")
  cli.input_file("graph", graph_path,
                 required=" (a graph.json from find_circuit or the PyTorch EAP-IG)")
  cli.input_file("compare", compare_path)
  name = os.path.basename(graph_path)
  meta = inputs.read_meta(graph_path)
  run = common.settings_from_meta(meta, {k: DEFAULTS[k] for k in FROM_META}, name,
                                  unwarned=("model",) if meta.get("model_hash") else ())
  intervention = run["intervention"]
  if intervention not in INTERVENTIONS:
    raise app.UsageError(f"--intervention={intervention}: choose from {', '.join(INTERVENTIONS)}")
  if run["metric"] not in tasks.METRICS:
    raise app.UsageError(f"--metric={run['metric']}: choose from {', '.join(tasks.METRICS)}")
  common.positive("n_examples", run["n_examples"])

  with common.run_dir(out) as held:
    model = common.load_model(run["model"])
    graph = _load_graph(graph_path, model.cfg, "--graph")
    compare = _load_graph(compare_path, model.cfg, "--compare") if compare_path else None
    inputs.check_model_hash(model, run["model"], meta, name, _flag("force"))
    dataset = common.load_dataset(model, run["model"], run["task"], run["data"], run["n_examples"],
                                  run["prepend_bos"], run["seed"], run["skip_bad_rows"])
    if meta.get("data_hash") and not any(cli.given(k) for k in DATA_FLAGS) and \
        inputs.dataset_hash(dataset) != meta["data_hash"]:
      cli.warn(f"the examples differ from those {name} was found with (its meta's data_hash); "
               f"has --data={run['data']} changed since?")
    dataset = dataclasses.replace(dataset, task=tasks.with_metric(dataset.task, run["metric"]))
    try:
      summary, curve, circuit = evaluate(model, graph, dataset, intervention=intervention,
                                         batch_size=batch_size, top_n=top_n, compare=compare)
      if _flag("protocol") == "mib":
        summary["mib"] = evaluation.mib_protocol(
            model.cfg, model.params, dataset, graph, level=_flag("mib_level"),
            absolute=_flag("mib_absolute"), log_scale=_flag("log_scale"), intervention=intervention,
            batch_size=batch_size)
    except (AttributionError, G.GraphError, tasks.TaskError) as e:
      raise app.UsageError(str(e)) from None
    summary["graph"] = os.path.abspath(graph_path)
    summary["settings"] = {k: run[k] for k in FROM_META}
    if compare_path:
      summary["compare"]["graph"] = os.path.abspath(compare_path)

    with held.writing(OUTPUTS):
      plots.plot_faithfulness(curve, os.path.join(out, "faithfulness.png"),
                              title=f"{name}: {summary['task']}, {intervention}")
      plots.plot_circuit(circuit, os.path.join(out, "circuit.png"),
                         title=f"{name} ({summary['selection']})")
      viewer.write_html(graph, os.path.join(out, "circuit.html"), curve=curve, n=top_n,
                        title=f"{name} ({summary['selection']})")
      files.atomic_write_csv(os.path.join(out, "faithfulness.csv"), curve.rows())
      files.atomic_write_json(os.path.join(out, "evaluation.json"), summary)

  print(f"circuit {name} ({summary['selection']}): {summary['n_edges']} of "
        f"{summary['n_edges_total']} edges, {summary['n_nodes']} nodes")
  print(f"metric: circuit {summary['metric_circuit']:.4f}, full {summary['metric_full']:.4f}, "
        f"empty {summary['metric_empty']:.4f}")
  print(f"faithfulness {summary['faithfulness']:.4f}   CPR {summary['CPR']:.4f}   "
        f"CMD {summary['CMD']:.4f}")
  if "mib" in summary:
    m = summary["mib"]
    print(f"MIB protocol ({m['level']}s, {'absolute' if m['absolute'] else 'signed'} ranking"
          f"{', log scale' if m['log_scale'] else ''}): CPR (area_under) {m['area_under']:.4f}   "
          f"CMD (area_from_1) {m['area_from_1']:.4f}   average {m['average']:.4f}")
  if compare is not None:
    c = summary["compare"]
    print(f"overlap with {compare_path} ({c['n_edges']} edges): edge IoU "
          f"{c['edge_iou']:.3f}, node IoU {c['node_iou']:.3f}")
  print(f"wrote {os.path.join(out, 'evaluation.json')}")
  logging.info("evaluation written to %s", out)


if __name__ == "__main__":
  cli.run(main)
