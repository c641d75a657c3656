"""The evaluation report of a saved circuit (`experiments/evaluate_circuit.py`'s pipeline).

`evaluate_circuit(config, out)` loads the model and a graph.json (ours or the PyTorch EAP-IG's),
takes the settings its `meta` records for those `config` leaves unset, refuses a model whose weights
differ from the recorded hash (unless `force`), checks that the model does the task
(`task_check`, applying the `filter` the circuit was found with) and writes under `out`
(default: `evaluation/` beside the graph): `evaluation.json` (the numbers of `evaluate`, the task
check, and MIB's protocol with `protocol="mib"`), `faithfulness.csv` and `.png` (the |score| curve
at MIB's percentages), `circuit.png` and `circuit.html`, then `DONE`. `out` is a run directory of
its own: one holding another binary's outputs (the graph's own run) or an evaluation with other
settings is refused unless `overwrite`; the same evaluation, finished, is left untouched.

`evaluate` holds the numbers: the circuit's faithfulness `(m(C) - m(empty)) / (m(full) - m(empty))`
(`circuits.normalized_faithfulness`), the |score| curve (`faithfulness.faithfulness_curve`), MIB's
CPR and CMD (`faithfulness.mib_scores`), and the edge and node IoU with a second circuit.
A position- or span-level graph.json (find_circuit `--level=position`) is evaluated at its level by
`position_report` (its numbers equal find_circuit's for the same circuit and batch size).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jaxinterp import circuits as G
from jaxinterp import tasks
from jaxinterp.attribution import INTERVENTIONS, Ablation, AttributionError, make_ablation, optimal
from jaxinterp.evaluation import faithfulness, task_check
from jaxinterp.evaluation import position_report as PR
from jaxinterp.models import Model
from jaxinterp.runtime import files, inputs
from jaxinterp.viz import plots, viewer

# The settings read from graph.json's meta (how the circuit was found) when a config leaves them
# None, and their defaults when the meta records none.
META_DEFAULTS = dict(model="toy", task="induction", data=None, metric="task", prepend_bos=True,
                     intervention="patching", seed=0, n_examples=64, skip_bad_rows=False,
                     filter="none")
DATA_SETTINGS = ("task", "data", "prepend_bos", "seed", "n_examples", "skip_bad_rows", "filter")
BINARY = "evaluate_circuit"
OUT_DIR = "evaluation"  # the default output directory, beside the graph
OUTPUTS = ("evaluation.json", "faithfulness.csv", "faithfulness.png", "circuit.png", "circuit.html")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
  """What `evaluate_circuit` evaluates, and how. Fields named as the binary's flags.

  The fields defaulting to None are read from graph.json's meta when None (else `META_DEFAULTS`).
  """

  graph: str | None = None  # graph.json to evaluate (ours or from the PyTorch EAP-IG)
  compare: str | None = None  # a second graph.json: edge and node IoU with it
  top_n: int | None = None  # re-select the top-n edges by |score| instead of in_graph
  batch_size: int = 16
  force: bool = False  # evaluate a model whose weights differ from the meta's hash
  protocol: str = "default"  # "mib": MIB's evaluate_area_under_curve too
  mib_level: str = "edge"  # protocol="mib": rank edges, or nodes by the graph's node scores
  log_scale: bool = False  # protocol="mib": areas over log(fraction)
  mib_absolute: bool = False  # protocol="mib": rank by |score| (else by signed importance)
  mib_split: str = "train"  # the split of a local copy of an MIB dataset (`data`)
  model: str | None = None  # 'toy', an HF checkpoint dir or an orbax conversion
  tokenizer: str | None = None  # a tokenizer.json (or its directory), for a model without one
  task: str | None = None
  data: str | None = None  # task CSV (or MIB copy); optional for induction (generated)
  metric: str | None = None  # "task" or a name in `tasks.METRICS`
  prepend_bos: bool | None = None
  intervention: str | None = None  # how edges outside the circuit are ablated
  seed: int | None = None  # seed of generated data
  n_examples: int | None = None
  skip_bad_rows: bool | None = None
  filter: str | None = None  # "correct": only the rows the model gets right (`task_check`)
  # intervention="optimal": the learned constants' directory (default: those the graph was found
  # with, its meta's optimal_values or the optimal_ablation/ beside it)
  optimal_values: str | None = None


def _load_graph(path: str, cfg, what: str) -> G.Graph:
  """The graph file at `path` (checked to exist); an InputError naming `what` if unreadable."""
  try:
    return G.Graph.from_json(path, cfg=cfg)
  except G.GraphError as e:
    raise inputs.InputError(f"{what}: {e}") from None


def _select(g: G.Graph, top_n: int | None) -> G.Graph:
  if top_n is None:
    return g
  try:
    return g.top_n(top_n, absolute=True)
  except G.GraphError as e:
    raise inputs.InputError(f"--top_n: {e}") from None


def evaluate(model: Model, graph: G.Graph, dataset: tasks.Dataset, *, ablation: Ablation,
             batch_size: int, top_n: int | None = None, compare: G.Graph | None = None
             ) -> tuple[dict, faithfulness.FaithfulnessCurve, G.Graph]:
  """All numbers of the report: (summary dict, the |score| faithfulness curve, the circuit).

  The circuit is the graph's `in_graph`, or its top `top_n` edges by |score| (pruned). The curve's
  and MIB's circuits are the graph's top-n by |score| (curve, CMD) and by signed importance (CPR)
  at `circuits.MIB_PERCENTAGES`; all share `ablation` (`make_ablation`, built once). Raises
  AttributionError when the full model and the empty circuit give the same metric.
  """
  cfg, params, intervention = model.cfg, model.params, ablation.kind
  circuit = _select(graph, top_n)
  weights = np.stack([c.edge_weights() for c in (graph.full(), graph.empty(), circuit)])
  m_full, m_empty, m_circuit = (float(x) for x in faithfulness.evaluate_circuits(
      cfg, params, dataset, weights, batch_size=batch_size, ablation=ablation))
  if m_full == m_empty:
    raise AttributionError("the full model and the empty circuit give the same metric, so "
                           "faithfulness is undefined for this data and intervention")
  convention = graph.score_convention
  curve = faithfulness.faithfulness_curve(cfg, params, dataset, graph.scores, batch_size=batch_size,
                                          ablation=ablation, score_convention=convention)
  mib = faithfulness.mib_scores(cfg, params, dataset, graph.scores, intervention=intervention,
                                batch_size=batch_size, score_convention=convention,
                                ablation=ablation)
  summary = {
      "model": model.path, "task": dataset.task.name, "data": dataset.source,
      "n_examples": len(dataset), "intervention": intervention,
      "selection": "in_graph" if top_n is None else f"top_n={top_n} (|score|, pruned)",
      "n_edges_total": graph.n_edges, "n_edges": circuit.count_edges(),
      "n_nodes": circuit.count_nodes(),
      "metric_circuit": m_circuit, "metric_full": m_full, "metric_empty": m_empty,
      "faithfulness": G.normalized_faithfulness(m_circuit, m_full, m_empty),
      "CPR": mib["CPR"], "CMD": mib["CMD"], "curve": curve.rows(),
  }
  if compare is not None:
    other = _select(compare, top_n)
    summary["compare"] = {"n_edges": other.count_edges(), "n_nodes": other.count_nodes(),
                          "edge_iou": G.edge_iou(circuit, other),
                          "node_iou": G.node_iou(circuit, other)}
  return summary, curve, circuit


def _settings(config: EvaluateConfig, meta: dict, name: str) -> dict:
  """The meta settings (`META_DEFAULTS`) of this run, checked."""
  given = {k: getattr(config, k) for k in META_DEFAULTS}
  run = inputs.settings_from_meta(meta, given, META_DEFAULTS, name,
                                  unwarned=("model",) if meta.get("model_hash") else ())
  if run["intervention"] not in INTERVENTIONS:
    raise inputs.InputError(f"--intervention={run['intervention']}: choose from "
                            f"{', '.join(INTERVENTIONS)}")
  if run["metric"] not in tasks.METRICS:
    raise inputs.InputError(f"--metric={run['metric']}: choose from {', '.join(tasks.METRICS)}")
  if run["filter"] not in task_check.FILTERS:
    raise inputs.InputError(f"--filter={run['filter']}: choose from "
                            f"{', '.join(task_check.FILTERS)}")
  checked = meta.get("task_check")
  if config.n_examples is None and run["filter"] != "none" and isinstance(checked, dict) and \
      isinstance(checked.get("n_rows"), int):  # the rows loaded before the filter kept meta's
    run["n_examples"] = checked["n_rows"]
  inputs.positive("n_examples", run["n_examples"])
  return run


def default_out(graph: str) -> str:
  """Where an evaluation of `graph` goes by default: `evaluation/` beside it."""
  return os.path.join(os.path.dirname(os.path.abspath(graph)), OUT_DIR)


def run_record(config: EvaluateConfig) -> files.RunRecord:
  """The evaluation's record in `out/run.json`: the config and its input files' digests."""
  paths = {k: os.path.abspath(getattr(config, k)) for k in ("graph", "compare", "data")
           if getattr(config, k)}  # however they are spelled
  return files.RunRecord(BINARY, dict(dataclasses.asdict(config), **paths,
                                      graph_sha256=inputs.file_digest(config.graph),
                                      compare_sha256=inputs.file_digest(config.compare),
                                      data_sha256=inputs.file_digest(config.data)),
                         ("graph", "top_n", "protocol"))


def _print(summary: dict, name: str, compare: str | None, out: str) -> None:
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
  if compare:
    c = summary["compare"]
    print(f"overlap with {compare} ({c['n_edges']} edges): edge IoU "
          f"{c['edge_iou']:.3f}, node IoU {c['node_iou']:.3f}")
  print(f"wrote {os.path.join(out, 'evaluation.json')}")


def _ablation(config: EvaluateConfig, meta: dict, model: Model, dataset: tasks.Dataset,
              intervention: str, batch_size: int) -> tuple[Ablation, str | None]:
  """The one ablation every number shares, and for "optimal" where its constants came from. Those
  are the constants the graph was found with: `config.optimal_values`, else the directory its
  find_circuit run loaded them from (meta's `optimal_values`) or saved them to (`optimal_ablation/`
  beside the graph); only without any of these are they trained here ("trained here")."""
  if config.optimal_values is not None and intervention != "optimal":
    raise inputs.InputError(f"--optimal_values is for --intervention=optimal, not {intervention}")
  values, where = None, ""
  if intervention == "optimal":  # the first of these given
    own = os.path.join(os.path.dirname(os.path.abspath(config.graph)), optimal.RUN_DIR)
    sources = ((config.optimal_values, "--optimal_values"),
               (meta.get("optimal_values"), "--graph's meta optimal_values"),
               (own if os.path.isdir(own) else None, ""))
    values, where = next(((v, w) for v, w in sources if v), (None, ""))
  try:
    ablation = make_ablation(model.cfg, model.params, dataset, intervention, batch_size,
                             optimal_values=values)
  except AttributionError as e:
    raise inputs.InputError(f"{where}={values}: {e}" if where else str(e)) from None
  if intervention != "optimal":
    return ablation, None
  return ablation, os.path.abspath(values) if values else "trained here"


def evaluate_circuit(config: EvaluateConfig, out: str | None = None, *,
                     overwrite: bool = False) -> dict:
  """Evaluate `config.graph` and write the report under `out` (default `default_out(graph)`; see
  the module docstring); prints a summary and returns `evaluation.json`'s contents (for an
  evaluation already complete there, those read back). Bad input raises `inputs.InputError`."""
  batch_size, top_n = inputs.positive("batch_size", config.batch_size), config.top_n
  if top_n is not None:
    inputs.positive("top_n", top_n, 0)
  inputs.input_file("graph", config.graph,
                    required=" (a graph.json from find_circuit or the PyTorch EAP-IG)")
  inputs.input_file("compare", config.compare)
  name = os.path.basename(config.graph)
  meta = inputs.read_meta(config.graph)
  level = PR.graph_level(config.graph)  # a position- or span-level graph: `position_report`
  PR.check_flags(level, protocol=config.protocol, mib_level=config.mib_level,
                 log_scale=config.log_scale, mib_absolute=config.mib_absolute,
                 compare_level=PR.graph_level(config.compare) if config.compare else None)
  run = _settings(config, meta, name)
  out = out or default_out(config.graph)
  record = run_record(config)
  with inputs.run_dir(out, record=record, overwrite=overwrite) as held:
    if held.complete:
      inputs.already_complete(out, record)
      with open(os.path.join(out, "evaluation.json")) as f:
        return json.load(f)
    model = inputs.load_model(run["model"], tokenizer=config.tokenizer)
    load = _load_graph if level == "edge" else PR.load
    graph = load(config.graph, model.cfg, "--graph")
    compare = load(config.compare, model.cfg, "--compare") if config.compare else None
    inputs.check_model_hash(model, run["model"], meta, name, config.force)
    dataset = inputs.load_dataset(model, run["model"], run["task"], run["data"], run["n_examples"],
                                  run["prepend_bos"], run["seed"], run["skip_bad_rows"],
                                  mib_split=config.mib_split)
    dataset, checked = task_check.check_and_filter(model.cfg, model.params, dataset,
                                                   run["filter"], batch_size=batch_size)
    if meta.get("data_hash") and all(getattr(config, k) is None for k in DATA_SETTINGS) and \
        inputs.dataset_hash(dataset) != meta["data_hash"]:
      inputs.warn(f"the examples differ from those {name} was found with (its meta's data_hash); "
                  f"has --data={run['data']} changed since?")
    dataset = dataclasses.replace(dataset, task=tasks.with_metric(dataset.task, run["metric"]))
    intervention = run["intervention"]
    ablation, source = _ablation(config, meta, model, dataset, intervention, batch_size)
    if level != "edge":
      return _evaluate_positions(config, graph, compare, model, dataset, run, meta, checked,
                                 held, out, ablation, source)
    try:
      summary, curve, circuit = evaluate(model, graph, dataset, ablation=ablation,
                                         batch_size=batch_size, top_n=top_n, compare=compare)
      if config.protocol == "mib":
        summary["mib"] = faithfulness.mib_protocol(
            model.cfg, model.params, dataset, graph, level=config.mib_level,
            absolute=config.mib_absolute, log_scale=config.log_scale, intervention=intervention,
            batch_size=batch_size, ablation=ablation)
    except (AttributionError, G.GraphError, tasks.TaskError) as e:
      raise inputs.InputError(str(e)) from None
    _complete(summary, config, run, checked, dataset, source)

    method = meta.get("method", "unknown method")  # the method that found the circuit
    title = f"{method}: {name} ({summary['selection']})"
    with held.writing(OUTPUTS):
      plots.plot_faithfulness(curve, os.path.join(out, "faithfulness.png"),
                              title=f"{method}: {name}, {summary['task']}, {intervention}")
      plots.plot_circuit(circuit, os.path.join(out, "circuit.png"), title=title)
      viewer.write_html(graph, os.path.join(out, "circuit.html"), curve=curve, n=top_n, title=title)
      files.atomic_write_csv(os.path.join(out, "faithfulness.csv"), curve.rows())
      files.atomic_write_json(os.path.join(out, "evaluation.json"), summary)
  _print(summary, name, config.compare, out)
  return summary


def _complete(summary: dict, config: EvaluateConfig, run: dict, checked: dict,
              dataset: tasks.Dataset, source: str | None) -> None:
  """What every level's summary ends with: the empty-circuit warning, the task check, the graph
  paths, the settings used and, under optimal ablation, where its constants came from
  (`source`, from `_ablation`)."""
  task_check.warn_empty(checked, summary["metric_full"], summary["metric_empty"],
                        dataset.task.higher_is_better)
  summary["task_check"] = checked
  summary["graph"] = os.path.abspath(config.graph)
  summary["settings"] = {k: run[k] for k in META_DEFAULTS}
  if config.compare:
    summary["compare"]["graph"] = os.path.abspath(config.compare)
  if source is not None:
    summary["optimal_values"] = source


def _evaluate_positions(config: EvaluateConfig, saved: PR.SavedCircuit,
                        compare: PR.SavedCircuit | None, model: Model, dataset: tasks.Dataset,
                        run: dict, meta: dict, checked: dict, held: files.RunDir,
                        out: str, ablation: Ablation, source: str | None) -> dict:
  """`evaluate_circuit` for a position- or span-level graph (`position_report`): the curve's
  sizes and ranking are those the circuit was found with (its meta's `curve_sizes`, `absolute`)."""
  name = os.path.basename(config.graph)
  absolute = meta.get("absolute", True)
  summary, curve, circuit = PR.evaluate(
      model, saved, dataset, intervention=run["intervention"], batch_size=config.batch_size,
      absolute=absolute if isinstance(absolute, bool) else True,
      curve_sizes=str(meta.get("curve_sizes", "counts")), top_n=config.top_n,
      prepend_bos=run["prepend_bos"], compare=compare, ablation=ablation)
  _complete(summary, config, run, checked, dataset, source)
  method = meta.get("method", "unknown method")
  title = f"{method}: {name}, {summary['task']}, {saved.level} level ({summary['selection']})"
  with held.writing(PR.OUTPUTS[saved.level]):
    PR.write_outputs(out, saved, config.graph, summary, curve, circuit, dataset, title=title)
  PR.print_summary(summary, name, config.compare, out)
  return summary
