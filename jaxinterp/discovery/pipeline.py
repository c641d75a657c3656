"""`find_circuit(config, out)`: attribute, select a circuit, evaluate its faithfulness, write it.

The library form of `experiments/find_circuit.py` (which builds a `FindCircuitConfig` from its
flags and calls this): load the model and the task's data, optionally shard over a device mesh,
check that the model does the task (`evaluation.task_check`: the clean and corrupted metric, the
fraction of rows it gets right, top-1 accuracy; `filter="correct"` keeps the right rows only),
learn optimal-ablation constants if asked, attribute with resumable checkpoints
(`attribution.Checkpointer` under `out/.resume`), select the circuit, compute its faithfulness
curve and write the outputs (and an MIB submission), printing a short report. This module runs the
edge, node and neuron levels; a --level=position run goes to `discovery.positions`, and with
--schema to `discovery.spans`.

Bad input is an `inputs.InputError` with one line naming the flag (the config field) at fault.
`out` is a run directory (`files.RunDir` with this run's `RunRecord`): a directory holding another
binary's outputs, or a finished run with other settings, is refused unless `overwrite`; a finished
run with the same settings is reported "already complete" and left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterator

import numpy as np

import jaxinterp
from jaxinterp import attribution as A
from jaxinterp import circuits as G
from jaxinterp import models, tasks
from jaxinterp.attribution import bootstrap, memory_budget, optimal
from jaxinterp.circuits import convention
from jaxinterp.discovery import positions
from jaxinterp.discovery import spans as span_level
from jaxinterp.discovery.config import TOP_N, FindCircuitConfig, record
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.evaluation import levels, task_check
from jaxinterp.runtime import compilation_cache, files, inputs, sharding, timing
from jaxinterp.viz import plots, viewer

BINARY = "find_circuit"  # the run record's binary
HEADLINE = ("method", "task", "model", "n_examples")  # the settings naming a run in messages
RESUME_DIR = ".resume"
OUTPUTS = ("graph.json", "scores.npz", "faithfulness.csv", "circuit.png", "faithfulness.png",
           "circuit.html")
PHASES = ("load", "compile", "attribute", "curve", "write")  # the order they are reported in
# Checks of settings whose messages predate the generated flags: (name, minimum) of integers ...
AT_LEAST = (("n_examples", 1), ("batch_size", 1), ("ig_steps", 1), ("top_n", 0),
            ("checkpoint_batches", 0), ("mask_steps", 1), ("oa_steps", 1), ("bootstrap", 2))
POSITIVE = ("tau", "sparsity", "mask_lr", "oa_lr")  # ... and numbers that must be > 0


def check(config: FindCircuitConfig) -> A.Options:
  """The method's options for `config`, after checking every setting that needs no model.

  InputError (one line) for a value out of range, an unknown method, an option the method does
  not have (`--tau does not apply to --method=EAP`) or a level the outputs cannot take.
  """
  settings = record(config)
  for name, minimum in AT_LEAST:
    if settings.get(name) is not None:
      inputs.positive(name, settings[name], minimum)
  for name in POSITIVE:
    if settings.get(name) is not None and not settings[name] > 0:
      raise inputs.InputError(f"--{name} must be positive, got {settings[name]}")
  if settings.get("sparsity") is not None and settings["sparsity"] >= 1:
    raise inputs.InputError(f"--sparsity is the fraction of edges removed: it must be below 1, "
                            f"got {settings['sparsity']}")
  try:
    method = A.get_method(config.method)
  except A.AttributionError as e:
    raise inputs.InputError(f"--method={config.method}: {e}") from None
  unused = sorted(set(config.options) - method.option_names)
  if unused:
    raise inputs.InputError(f"--{unused[0]} does not apply to --method={method.name}")
  shared = {"batch_size": config.batch_size, "seed": config.seed}
  try:
    options = A.make_options(method, shared, **config.options)
  except A.AttributionError as e:
    raise inputs.InputError(str(e)) from None
  if config.mib_out and options.level != "edge":
    raise inputs.InputError("--mib_out writes edge scores: it needs --level=edge")
  if config.fsdp and not config.mesh:
    raise inputs.InputError("--fsdp shards the weights over a --mesh's DATA axis; give --mesh")
  if options.level == "position" or config.schema or config.span_aggregation:
    span_level.check(config, options.level)
    positions.check(config)
  if config.selection != "top_n" and options.level != "edge":
    raise inputs.InputError(f"--selection={config.selection} selects edges; use --level=edge")
  if config.filter not in task_check.FILTERS:
    raise inputs.InputError(f"--filter={config.filter}: choose from "
                            f"{', '.join(task_check.FILTERS)}")
  return options


def run_record(config: FindCircuitConfig) -> files.RunRecord:
  """The run's record in `out/run.json`: `record(config)` and the digest of the data file."""
  return files.RunRecord(BINARY, dict(record(config), data_sha256=inputs.file_digest(config.data)),
                         HEADLINE)


def find_circuit(config: FindCircuitConfig, out: str, *, overwrite: bool = False) -> dict:
  """Run `config`, writing to the directory `out` (held for the run: a second run on it is refused,
  and `DONE` is written after every output). A directory holding another binary's outputs or a
  finished run with other settings is refused unless `overwrite` (which also drops a checkpoint);
  one holding this finished run is left untouched.

  Returns the summary: top_edges [(name, score)], faithfulness, n_edges (selected), level,
  n_edges_kept, n_nodes, m_full, m_empty, seconds, attribution_seconds, out, phase_seconds,
  task_check; for a run already complete, {"out", "complete": True} and graph.json's meta.
  """
  options = check(config)
  run = run_record(config)
  with _hold(out, run, overwrite) as held:
    if held.complete:
      inputs.already_complete(out, run)
      return dict(inputs.read_meta(os.path.join(out, "graph.json")), out=out, complete=True)
    memory_budget.start_run()  # this run's --memory_budget notes (and meta) only
    with timing.Phases(PHASES) as phases:
      return _run(config, options, held, phases, overwrite)


@contextlib.contextmanager
def _hold(out: str, run: files.RunRecord, overwrite: bool) -> Iterator[files.RunDir]:
  try:
    with inputs.run_dir(out, record=run, overwrite=overwrite) as held:
      yield held
  except A.AttributionError as e:  # what the library below says of bad input, as one line
    raise inputs.InputError(str(e)) from None


def _kernel_ahead(config: FindCircuitConfig, options: A.Options, model: models.Model,
                  dataset: tasks.Dataset) -> threading.Thread | None:
  """Start compiling the attribution kernel (`attribution.compile_ahead`) so that it compiles while
  the task check runs; None where it cannot know the batches yet (`--filter` drops rows), for
  other levels, or on a mesh (whose batches are sharded)."""
  if options.level != "edge" or config.mesh is not None or config.filter != "none":
    return None
  data = dataclasses.replace(dataset, task=tasks.with_metric(dataset.task, config.metric))
  return A.compile_ahead(model.cfg, model.params, data, config.method, options,
                         intervention=config.intervention, batch_size=config.batch_size)


def _run(config: FindCircuitConfig, options: A.Options, held: files.RunDir,
         phases: timing.Phases, overwrite: bool) -> dict:
  t0 = time.time()
  cache0 = compilation_cache.stats()
  phases.start("load")
  out = held.path
  method = A.get_method(config.method)
  model = inputs.load_model(config.model, config.dtype, config.tokenizer)
  dataset = inputs.load_dataset(model, config.model, config.task, config.data, config.n_examples,
                                config.prepend_bos, config.seed, skip_bad_rows=config.skip_bad_rows,
                                mib_split=config.mib_split)
  kernel_ahead = _kernel_ahead(config, options, model, dataset)  # compiles during the task check
  try:
    dataset, checked = task_check.check_and_filter(model.cfg, model.params, dataset,
                                                   config.filter, batch_size=config.batch_size)
    dataset = dataclasses.replace(dataset, task=tasks.with_metric(dataset.task, config.metric))
    mhash, dhash = inputs.model_hash(model), inputs.dataset_hash(dataset)
    if options.level == "position":  # positions.npz and its circuit, or --schema's span circuit
      run = span_level.run if config.schema else positions.run
      return run(config, options, held, phases, model, dataset, checked, t0)
    n_batches = -(-len(dataset) // config.batch_size)
    ckpt = None
    if method.checkpoints_always or n_batches > config.checkpoint_batches:
      ckpt = A.Checkpointer(os.path.join(out, RESUME_DIR),
                            dict(record(config), model_hash=mhash, data_hash=dhash))
    if ckpt and overwrite:
      ckpt.clear()  # --overwrite starts over
    resume = ckpt.load() if ckpt else None
    if resume is not None:
      print(f"resuming from checkpoint: batch {resume.next_batch} of {n_batches}")
    params, batch_fn = _mesh(config, model)
  except BaseException:
    if kernel_ahead is not None:  # never exit while XLA compiles in that thread: it aborts
      kernel_ahead.join()
    raise
  phases.start("attribute")
  phases.wait_for_compile(kernel_ahead)  # any wait left is compile time
  level = options.level
  # The curve's circuit forward compiles in a thread meanwhile (off the critical path).
  ahead = (V.compile_ahead(model.cfg, model.params, dataset, intervention=config.intervention,
                           batch_size=config.batch_size) if level == "edge" else None)
  try:
    ablation = (_optimal_ablation(config, model, dataset, out) if config.intervention == "optimal"
                else None)
    result = A.attribute(model.cfg, params, dataset, config.method, options,
                         intervention=config.intervention, batch_size=config.batch_size,
                         resume=resume, on_batch=ckpt.save if ckpt else None, batch_fn=batch_fn,
                         bootstrap=config.bootstrap, seed=config.seed, ablation=ablation)
  except BaseException:
    if ahead is not None:  # never exit while XLA compiles in that thread: it aborts the process
      ahead.join()
    raise
  t_attr = time.time() - t0

  phases.start("curve")
  phases.wait_for_compile(ahead)
  conv = method.score_convention(dataset.task)
  g = G.Graph.from_config(model.cfg, result.scores if level == "edge" else None, conv)
  n_total = levels.n_scored(result.scores, level, model.cfg)
  n_sel = min(TOP_N if config.top_n is None else config.top_n, n_total)
  own = result.extras.get("circuit") if level == "edge" and config.top_n is None else None
  if own is not None:  # edge pruning's and ACDC's own circuit, unless top_n asks for another
    n_sel = int(np.sum(own))
    circuit = g.with_edges(own, prune=True)
  elif level == "edge":
    circuit = (g.top_n(n_sel, absolute=config.absolute) if config.selection == "top_n"
               else g.greedy(n_sel, absolute=config.absolute))
  else:
    circuit = levels.top_n(model.cfg, result.scores, n_sel, level, absolute=config.absolute,
                           score_convention=conv)
  sizes = V.curve_sizes(config.curve_sizes, n_total, [n_sel])
  if level == "edge":
    curve = V.faithfulness_curve(model.cfg, model.params, dataset, result.scores, n_edges=sizes,
                                 absolute=config.absolute, intervention=config.intervention,
                                 batch_size=config.batch_size, ablation=ablation)
  else:
    curve = levels.faithfulness_curve(model.cfg, model.params, dataset, result.scores, level,
                                      counts=sizes, absolute=config.absolute,
                                      score_convention=conv, intervention=config.intervention,
                                      batch_size=config.batch_size, ablation=ablation)
  faith = float(curve.faithfulness[sizes.index(n_sel)])
  task_check.warn_empty(checked, curve.m_full, curve.m_empty, dataset.task.higher_is_better)
  if own is not None:  # the method's circuit itself, not the top-n by score
    m_own = V.evaluate_circuits(model.cfg, model.params, dataset, circuit.edge_weights(),
                                batch_size=config.batch_size, quiet=True,
                                ablation=ablation or A.make_ablation(
                                    model.cfg, model.params, dataset, config.intervention,
                                    config.batch_size))
    faith = float(G.normalized_faithfulness(m_own, curve.m_full, curve.m_empty))
  node_scores = (A.node_scores(model.cfg, result.scores) if level == "edge" else
                 result.scores if level == "node" else result.scores.sum(1))
  arrays, boot = {}, None
  if config.bootstrap is not None:
    valid = g.valid if level == "edge" else np.ones(result.scores.shape, bool)
    chosen = {"edge": circuit.in_graph, "node": circuit.nodes_in_graph,
              "neuron": circuit.neurons_in_graph}[level]
    arrays = {k: result.extras[k] for k in ("bootstrap_std", "bootstrap_sign_fraction")}
    boot = dict(result.extras["bootstrap"], **bootstrap.summary(
        result.scores, arrays["bootstrap_std"], arrays["bootstrap_sign_fraction"], valid, chosen))

  meta = {"jaxinterp_version": jaxinterp.__version__, **record(config),
          **method.option_values(result.options),
          "model_path": os.path.abspath(inputs.resolve_model_path(config.model)),
          "model_hash": mhash,
          "data_path": os.path.abspath(config.data) if config.data else None, "data_hash": dhash,
          "n_examples": len(dataset), "top_n": n_sel, "clean_metric": result.clean_metric,
          "faithfulness": faith, "m_full": curve.m_full, "m_empty": curve.m_empty,
          "task_check": checked, convention.KEY: conv, **_optimal_settings(config, ablation)}
  if boot is not None:
    meta["bootstrap"] = boot
  if memory_budget.remat_chosen():  # the options above record --remat as given
    meta["remat_chosen_by_budget"] = True
  if level != "edge":  # drawings rank edges: by their sender's node score at node/neuron level
    shown = circuit.replace(scores=np.where(g.valid, node_scores[:, None], 0.0))
    if level == "neuron":
      arrays["neurons_in_graph"] = circuit.neurons_in_graph
  else:
    shown = circuit
  outputs = OUTPUTS + ((optimal.RUN_DIR,) if ablation is not None and not config.optimal_values
                       else ())
  phases.start("write")
  with held.writing(outputs):
    files.atomic_savez(os.path.join(out, "scores.npz"), scores=result.scores, valid=g.valid,
                       in_graph=circuit.in_graph, node_scores=node_scores,
                       nodes_in_graph=circuit.nodes_in_graph, meta=np.asarray(json.dumps(meta)),
                       **arrays)
    files.atomic_write_csv(os.path.join(out, "faithfulness.csv"), curve.rows())
    title = (f"{config.method} on {config.task} "
             f"({os.path.basename(config.model.rstrip('/'))})")
    plots.plot_circuit(shown, os.path.join(out, "circuit.png"), title=title)
    plots.plot_faithfulness(curve, os.path.join(out, "faithfulness.png"), title=title)
    viewer.write_html(shown.replace(meta=meta), os.path.join(out, "circuit.html"),
                      curve=curve if level == "edge" else None, title=title,
                      n=n_sel if level == "edge" else circuit.count_edges())
    meta.update(phase_seconds=phases.snapshot(), compile_seconds=phases.compile_by_kind,
                compilation_cache=compilation_cache.since(cache0))
    circuit.to_json(os.path.join(out, "graph.json"), meta=meta)  # last: its meta holds the times
  if ckpt:
    ckpt.clear()
  if config.mib_out:
    _write_submission(config, g)
  phases.stop()

  top = g.ranked_edges(10) if level == "edge" else _ranked(g, result.scores, 10)
  summary = {"top_edges": top, "faithfulness": faith, "n_edges": n_sel, "level": level,
             "n_edges_kept": circuit.count_edges(), "n_nodes": circuit.count_nodes(),
             "m_full": curve.m_full, "m_empty": curve.m_empty, "seconds": time.time() - t0,
             "attribution_seconds": t_attr, "out": out, "phase_seconds": phases.snapshot(),
             "task_check": checked}
  print(f"\n{config.method} ({config.intervention}) on {config.task}, {len(dataset)} examples, "
        f"model {config.model}: {n_total} {level}s")
  print(f"clean metric {curve.m_full:.4f}, empty circuit {curve.m_empty:.4f}")
  print(f"top {level}s (score: {convention.DISPLAYED}):")
  for name, s in top:
    print(f"  {name:28s} {convention.displayed(s, conv):+.4f}")
  if boot is not None:
    sel = boot.get("selected", {})
    print(f"bootstrap ({boot['resamples']} resamples of {boot['n_units']} batches): circuit's mean "
          f"sign stability {sel.get('mean_sign_fraction', float('nan')):.3f}")
  print(f"circuit: top {n_sel} {level}s -> {circuit.count_edges()} edges, {circuit.count_nodes()} "
        f"nodes after pruning; faithfulness {faith:.3f}")
  print(f"wrote {out}/{', '.join(outputs)} ({summary['seconds']:.1f} s)")
  print(f"phases: {phases.line()}")
  return summary


def _optimal_settings(config: FindCircuitConfig, ablation: A.Ablation | None) -> dict:
  """Optimal ablation's options, whole, when this run trained its constants (else {})."""
  if ablation is None or config.optimal_values:
    return {}
  opts = optimal.OptimalOptions(oa_batch=config.batch_size, **config.optimal)
  return {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("progress", "level",
                                                                          "remat")}


def _mesh(config: FindCircuitConfig, model: models.Model):
  """(params, batch_fn): sharded over `config.mesh` (DATAxMODEL), or as they are."""
  if not config.mesh:
    return model.params, None
  try:
    n_data, n_model = (int(x) for x in config.mesh.lower().split("x"))
    mesh = sharding.make_mesh(n_data, n_model)
  except (ValueError, sharding.ShardingError) as e:
    raise inputs.InputError(f"--mesh={config.mesh}: {e} (expected DATAxMODEL, e.g. 2x4)") from None
  if config.batch_size % n_data:
    raise inputs.InputError(f"--batch_size={config.batch_size} must be a multiple of the mesh's "
                            f"data axis ({n_data})")

  def batch_fn(b):
    return sharding.shard_batch(b, mesh)

  return sharding.shard_params(model.params, mesh, fsdp=config.fsdp), batch_fn


def _optimal_ablation(config: FindCircuitConfig, model: models.Model, dataset: tasks.Dataset,
                      out: str) -> A.Ablation:
  """The learned constants of optimal ablation: loaded from `config.optimal_values`, or trained on
  the dataset's clean prompts and saved to out/optimal_ablation."""
  if config.optimal_values:
    return A.make_ablation(model.cfg, model.params, dataset, "optimal", config.batch_size,
                           optimal_values=config.optimal_values)
  try:
    opts = optimal.OptimalOptions(oa_batch=config.batch_size, progress=True, **config.optimal)
  except (A.AttributionError, TypeError) as e:
    raise inputs.InputError(str(e)) from None
  ablation = A.make_ablation(model.cfg, model.params, dataset, "optimal", config.batch_size,
                             optimal_values=opts)
  optimal.save_values(os.path.join(out, optimal.RUN_DIR), np.asarray(ablation.constants),
                      {"model_hash": inputs.model_hash(model), "task": config.task,
                       "n_examples": len(dataset), **dataclasses.asdict(opts)})
  print(f"optimal ablation: learned constants saved to {os.path.join(out, optimal.RUN_DIR)}")
  return ablation


def _write_submission(config: FindCircuitConfig, g: G.Graph) -> None:
  model_name = config.mib_model or os.path.basename(
      os.path.normpath(inputs.resolve_model_path(config.model)))
  try:
    folder = G.write_submission(g, config.mib_out, config.task, model_name,
                                kind=config.mib_format, absolute=config.absolute)
  except G.GraphError as e:
    raise inputs.InputError(f"--mib_out: {e}") from None
  print(f"wrote the MIB submission {folder}")


def _ranked(g: G.Graph, scores: np.ndarray, k: int) -> list[tuple[str, float]]:
  """The k best nodes (`a0.h3`) or neurons (`a0.h3[17]`) by |score|, as (name, score)."""
  flat = np.asarray(scores, np.float64).ravel()
  order = np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]
  if scores.ndim == 1:
    return [(g.sender_names[i], float(flat[i])) for i in order]
  d = scores.shape[1]
  return [(f"{g.sender_names[i // d]}[{i % d}]", float(flat[i])) for i in order]
