"""Find a circuit: attribute every edge, select the top edges, evaluate faithfulness, plot.

    python -m experiments.find_circuit            # EAP-IG on the bundled induction model
    python -m experiments.find_circuit --model=/path/to/hf_dir --task=ioi --data=ioi.csv \\
        --method=EAP-IG-inputs --ig_steps=5 --top_n=200 --out=runs/ioi

Writes to --out: graph.json (EAP-IG format, every valid edge with its score in EAP-IG's sign; a
`meta` section records the provenance), scores.npz, faithfulness.csv, circuit.png and
faithfulness.png; with --mib_out, an MIB leaderboard folder too. Long runs (the exact
method, or more than --checkpoint_batches batches) checkpoint their partial scores to
--out/.resume with orbax and resume from there when rerun with the same flags.

Ends with the phase times, `phases: load 1.2 s, compile 8.0 s, attribute 10.1 s, curve 3.0 s,
write 0.1 s (total 22.4 s)`, also in graph.json's `meta["phase_seconds"]` (`jaxinterp.runtime.timing`):
"compile" is JAX's tracing, lowering and XLA compiling wherever it happened, taken out of the other
phases. meta's "write" counts every output but graph.json itself (written last, holding the times).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from absl import app, flags, logging
import numpy as np

from jaxinterp.experiments import cli, common
from jaxinterp.runtime import inputs
import jaxinterp
from jaxinterp import attribution as A
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.runtime import files
from jaxinterp import circuits as G
from jaxinterp.evaluation import levels
from jaxinterp.attribution import bootstrap
from jaxinterp.circuits import convention
from jaxinterp.viz import plots
from jaxinterp import tasks
from jaxinterp.runtime import timing
from jaxinterp.viz import viewer

_MODEL = flags.DEFINE_string("model", common.TOY, "HF checkpoint dir, orbax conversion dir, or 'toy'.")
_TASK = flags.DEFINE_string("task", "induction", f"Task: one of {tasks.task_names()}.")
_DATA = flags.DEFINE_string("data", None, "CSV of clean/corrupted prompt pairs (not needed for "
                            "induction), or a local copy of an MIB dataset (directory, .jsonl, "
                            ".parquet).")
_METRIC = flags.DEFINE_enum("metric", "task", list(tasks.METRICS),
                            "Per-example metric: 'task' (the task's default, the EAP-IG paper's "
                            "choice), logit_diff or prob_diff (as the paper defines them for the "
                            "task), kl or js (divergence from the clean run), cross-entropy.")
_METHOD = flags.DEFINE_string("method", "EAP-IG-inputs", "Attribution method: " +
                              "; ".join(f"{m.name}: {m.description}" for m in A.METHODS.values()) +
                              "; or an ensemble 'A+B' (e.g. EAP+EAP-IG-inputs): the mean of the "
                              "members' rank-normalised scores.")
_LEVEL = flags.DEFINE_enum("level", "edge", list(A.LEVELS), "Score and select edges, nodes (NAP, "
                           "exact node patching) or neurons (each dimension of a node's output), "
                           "as the eap package's attribute_node; --top_n then counts nodes or "
                           "neurons. EAP, EAP-IG-inputs, clean-corrupted and exact (not neuron).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", None, "Bootstrap B resamples of the batches: per "
                                  "score its std and the fraction of resamples keeping its sign "
                                  "(scores.npz; a summary in graph.json meta). Resamples batches: "
                                  "a small --batch_size resamples finer.")
_IG_STEPS = flags.DEFINE_integer("ig_steps", 5, "Integrated-gradient steps m.")
_IG_CONVENTION = flags.DEFINE_enum("ig_convention", "eap", ["eap", "paper"],
                                   "eap: alpha = k/m, k=0..m-1; paper: k=1..m.")
_N_EXAMPLES = flags.DEFINE_integer("n_examples", 64, "Number of examples.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Examples per compiled call.")
_INTERVENTION = flags.DEFINE_enum("intervention", "patching", list(A.INTERVENTIONS),
                                  "How ablated edges are valued; 'optimal': per node the constant "
                                  "that minimises the loss when the node is ablated (optimal "
                                  "ablation, trained first, saved to --out/optimal_ablation).")
_OA_STEPS = flags.DEFINE_integer("oa_steps", None, "--intervention=optimal: at most this many Adam "
                                 "steps for the constants (default 1000, with MIB's early stop).")
_OA_LR = flags.DEFINE_float("oa_lr", None, "--intervention=optimal: Adam's learning rate "
                            "(default 1e-3, MIB's).")
_OPTIMAL_VALUES = flags.DEFINE_string("optimal_values", None, "--intervention=optimal: load the "
                                      "constants from this directory (an earlier run's "
                                      "--out/optimal_ablation) instead of training them.")
_TAU = flags.DEFINE_float("tau", None, "ACDC: remove an edge when removing it raises KL to the "
                          "clean model by less than tau (> 0; default 0.01).")
_SPARSITY = flags.DEFINE_float("sparsity", None, "edge-pruning: the target fraction of edges "
                               "removed, in (0, 1) (default 0.95); the circuit written is the "
                               "method's circuit at that sparsity unless --top_n is given.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "edge-pruning: warm-start the masks from the "
                                 "|scores| of an EAP-IG-format graph.json (e.g. an EAP-IG run's).")
_MASK_STEPS = flags.DEFINE_integer("mask_steps", None, "UGS, edge-pruning: optimiser steps "
                                   "(default 1000; about 0.05 s each on the bundled model on CPU).")
_MASK_LR = flags.DEFINE_float("mask_lr", None, "UGS, edge-pruning: learning rate (default: the "
                              "reference implementation's).")
_TOP_N = flags.DEFINE_integer("top_n", 20, "Edges in the selected circuit (before pruning).")
_CURVE = flags.DEFINE_enum("curve_sizes", "counts", ["counts", "mib"], "The faithfulness curve's "
                           "circuit sizes: counts (0, 1, 2, 5, 10, 20, 50, ... edges) or mib "
                           "(MIB's ten percentages of all edges, 0.1% to 100%); --top_n's size is "
                           "added.")
_SELECTION = flags.DEFINE_enum("selection", "top_n", ["top_n", "greedy"], "Circuit selection.")
_ABSOLUTE = flags.DEFINE_bool("absolute", True, "Rank edges by |score| (else signed score).")
_PREPEND_BOS = flags.DEFINE_bool("prepend_bos", True, "Prepend BOS as TransformerLens does.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for generated data (recorded in graph.json meta).")
_OUT = flags.DEFINE_string("out", "runs/find_circuit", "Output directory.")
_CHECKPOINT_BATCHES = flags.DEFINE_integer(
    "checkpoint_batches", 8, "Checkpoint after every batch when a run has more batches than this "
    "(the exact method always checkpoints).")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise blocks in the backward pass.")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh DATAxMODEL, e.g. 2x4: batches split over DATA "
                            "devices, heads and MLP columns over MODEL devices (jax.sharding). "
                            "Multi-host: call jax.distributed.initialize() first (see "
                            "jaxinterp/runtime/sharding.py).")

cli.define("bool", "skip_bad_rows", False, common.SKIP_BAD_ROWS_HELP)
_MIB_OUT = flags.DEFINE_string("mib_out", None, "Also write the edge scores as an MIB leaderboard "
                               "submission: DIR/{task}_{model}/ (see --mib_format).")
_MIB_FORMAT = flags.DEFINE_enum("mib_format", "importances", ["importances", "circuits"],
                                "importances: one importances.json of every edge's score; circuits: "
                                "nine binary circuits circuit_{p}.json of at most p% of the edges "
                                "(ranked as --absolute says).")
_MIB_MODEL = flags.DEFINE_string("mib_model", None, "The model's name in the --mib_out folder "
                                 "(MIB's: gpt2, qwen2.5, gemma2, llama3); default the --model "
                                 "directory's name.")

RESUME_DIR = ".resume"
OUTPUTS = ("graph.json", "scores.npz", "faithfulness.csv", "circuit.png", "faithfulness.png",
           "circuit.html")
FINGERPRINT = "fingerprint.json"
OPTIMAL_DIR = "optimal_ablation"
PHASES = ("load", "compile", "attribute", "curve", "write")  # the order they are reported in


# ------------------------------------------------------------------------------ resumable runs


def fingerprint(model_hash: str, dataset: tasks.Dataset) -> dict:
  """What must match for a checkpoint to be resumed (the weights, not the spelling of --model)."""
  return {"model_hash": model_hash, "task": _TASK.value, "data": _DATA.value,
          "data_hash": inputs.dataset_hash(dataset), "metric": _METRIC.value,
          "method": _METHOD.value, "ig_steps": _IG_STEPS.value,
          "ig_convention": _IG_CONVENTION.value, "intervention": _INTERVENTION.value,
          "n_examples": _N_EXAMPLES.value, "batch_size": _BATCH_SIZE.value,
          "prepend_bos": _PREPEND_BOS.value, "seed": _SEED.value, "level": _LEVEL.value,
          "bootstrap": _BOOTSTRAP.value, **_method_flags()}


class Checkpointer:
  """Partial score sums and progress, saved with orbax under --out/.resume after every batch.

  Each save goes to a new step directory (orbax finalises it atomically) and older steps are removed
  only after it succeeded, so a kill at any moment leaves a complete checkpoint.
  """

  def __init__(self, out: str, fp: dict):
    import orbax.checkpoint as ocp
    self.dir = os.path.abspath(os.path.join(out, RESUME_DIR))
    self.fp = fp
    self.ckptr = ocp.PyTreeCheckpointer()

  def _steps(self) -> list[int]:
    if not os.path.isdir(self.dir):
      return []
    return sorted(int(d[5:]) for d in os.listdir(self.dir)
                  if d.startswith("step_") and d[5:].isdigit())

  def load(self) -> A.Progress | None:
    steps = self._steps()
    if not steps:  # nothing complete to resume (possibly a stale fingerprint): start afresh
      self.clear()
      return None
    with open(os.path.join(self.dir, FINGERPRINT)) as f:
      saved = json.load(f)
    diff = {k: (saved.get(k), v) for k, v in self.fp.items() if saved.get(k) != v}
    if diff:
      lines = ", ".join(f"--{k}: checkpoint has {a!r}, now {b!r}" for k, (a, b) in diff.items())
      raise app.UsageError(f"{self.dir} holds a checkpoint of a different run ({lines}). Rerun with "
                           f"the same flags to resume, or delete {self.dir} to start over.")
    tree = self.ckptr.restore(os.path.join(self.dir, f"step_{steps[-1]:06d}"))
    sums, counts = None, None
    if "batch_sums" in tree:  # a --bootstrap run keeps every batch's sums
      sums = tuple(np.asarray(tree["batch_sums"]))
      counts = tuple(int(c) for c in np.asarray(tree["batch_counts"]))
    return A.Progress(next_batch=int(tree["next_batch"]), score_sum=np.asarray(tree["score_sum"]),
                      clean_sum=float(tree["clean_sum"]), seen=int(tree["seen"]),
                      batch_sums=sums, batch_counts=counts)

  def save(self, state: A.Progress) -> None:
    os.makedirs(self.dir, exist_ok=True)
    fp_path = os.path.join(self.dir, FINGERPRINT)
    if not os.path.exists(fp_path):
      files.atomic_write_text(fp_path, json.dumps(self.fp, indent=1))
    old = self._steps()
    tree = {"next_batch": np.int64(state.next_batch), "score_sum": state.score_sum,
            "clean_sum": np.float64(state.clean_sum), "seen": np.int64(state.seen)}
    if state.batch_sums:
      tree["batch_sums"] = np.stack(state.batch_sums)
      tree["batch_counts"] = np.asarray(state.batch_counts, np.int64)
    self.ckptr.save(os.path.join(self.dir, f"step_{state.next_batch:06d}"), tree, force=True)
    for s in old:
      if s != state.next_batch:
        shutil.rmtree(os.path.join(self.dir, f"step_{s:06d}"), ignore_errors=True)

  def clear(self) -> None:
    shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- main


def run(argv=None) -> dict:
  """Run with the current flags; returns the summary dict (also used by tests).

  `--out` is held for the run (`common.run_dir`): a second run on it is refused, and `DONE` is
  written after every output.
  """
  for name, flag, minimum in (("n_examples", _N_EXAMPLES, 1), ("batch_size", _BATCH_SIZE, 1),
                              ("ig_steps", _IG_STEPS, 1), ("top_n", _TOP_N, 0),
                              ("checkpoint_batches", _CHECKPOINT_BATCHES, 0)):
    common.positive(name, flag.value, minimum)
  if _BOOTSTRAP.value is not None:
    common.positive("bootstrap", _BOOTSTRAP.value, 2)
  for name, flag in (("tau", _TAU), ("sparsity", _SPARSITY), ("mask_lr", _MASK_LR),
                     ("oa_lr", _OA_LR)):
    if flag.value is not None and not flag.value > 0:
      raise app.UsageError(f"--{name} must be positive, got {flag.value}")
  if _SPARSITY.value is not None and _SPARSITY.value >= 1:
    raise app.UsageError(f"--sparsity is the fraction of edges removed: it must be below 1, got "
                         f"{_SPARSITY.value}")
  for name, flag in (("mask_steps", _MASK_STEPS), ("oa_steps", _OA_STEPS)):
    if flag.value is not None:
      common.positive(name, flag.value, 1)
  try:
    A.get_method(_METHOD.value)
  except A.AttributionError as e:
    raise app.UsageError(f"--method={_METHOD.value}: {e}") from None
  if _MIB_OUT.value and _LEVEL.value != "edge":
    raise app.UsageError("--mib_out writes edge scores: it needs --level=edge")
  with common.run_dir(_OUT.value) as held, timing.Phases(PHASES) as phases:
    return _run(held, phases)


def _run(held, phases: timing.Phases) -> dict:
  t0 = time.time()
  phases.start("load")
  out = held.path
  model = common.load_model(_MODEL.value)
  dataset = common.load_dataset(model, _MODEL.value, _TASK.value, _DATA.value, _N_EXAMPLES.value,
                                _PREPEND_BOS.value, _SEED.value,
                                skip_bad_rows=cli.value("skip_bad_rows", False))
  dataset = dataclasses.replace(dataset, task=tasks.with_metric(dataset.task, _METRIC.value))
  mhash = inputs.model_hash(model)
  fp = fingerprint(mhash, dataset)
  n_batches = -(-len(dataset) // _BATCH_SIZE.value)
  ckpt = None
  if "exact" in _METHOD.value.split("+") or n_batches > _CHECKPOINT_BATCHES.value:
    ckpt = Checkpointer(out, fp)
  resume = ckpt.load() if ckpt else None
  if resume is not None:
    logging.info("resuming from batch %d of %d", resume.next_batch, n_batches)
    print(f"resuming from checkpoint: batch {resume.next_batch} of {n_batches}")
  params, batch_fn = model.params, None
  if _MESH.value:
    from jaxinterp.runtime import sharding
    try:
      n_data, n_model = (int(x) for x in _MESH.value.lower().split("x"))
      mesh = sharding.make_mesh(n_data, n_model)
    except (ValueError, sharding.ShardingError) as e:
      raise app.UsageError(f"--mesh={_MESH.value}: {e} (expected DATAxMODEL, e.g. 2x4)") from None
    if _BATCH_SIZE.value % n_data:
      raise app.UsageError(f"--batch_size={_BATCH_SIZE.value} must be a multiple of the mesh's data "
                           f"axis ({n_data})")
    params = sharding.shard_params(model.params, mesh)
    batch_fn = lambda b: sharding.shard_batch(b, mesh)
  phases.start("attribute")
  # The curve's circuit forward compiles in a thread meanwhile (off the critical path).
  ahead = (V.compile_ahead(model.cfg, model.params, dataset, intervention=_INTERVENTION.value,
                           batch_size=_BATCH_SIZE.value) if _LEVEL.value == "edge" else None)
  try:
    options = _method_options(A.get_method(_METHOD.value))
    ablation = _optimal_ablation(model, dataset, out) if _INTERVENTION.value == "optimal" else None
    result = A.attribute(model.cfg, params, dataset, method=_METHOD.value,
                         intervention=_INTERVENTION.value, ig_steps=_IG_STEPS.value,
                         batch_size=_BATCH_SIZE.value, ig_convention=_IG_CONVENTION.value,
                         remat=_REMAT.value, resume=resume,
                         on_batch=ckpt.save if ckpt else None, batch_fn=batch_fn,
                         level=_LEVEL.value, bootstrap=_BOOTSTRAP.value, seed=_SEED.value,
                         options=options, ablation=ablation)
  except A.AttributionError as e:
    raise app.UsageError(str(e)) from None
  t_attr = time.time() - t0

  phases.start("curve")
  if ahead is not None:
    ahead.join()
  level = _LEVEL.value
  conv = A.get_method(_METHOD.value).score_convention(dataset.task)
  g = G.Graph.from_config(model.cfg, result.scores if level == "edge" else None, conv)
  n_total = levels.n_scored(result.scores, level, model.cfg)
  n_sel = min(_TOP_N.value, n_total)
  own = result.extras.get("circuit") if level == "edge" and not cli.given("top_n") else None
  if own is not None:  # edge pruning's and ACDC's own circuit, unless --top_n asks for another
    n_sel = int(np.sum(own))
    circuit = g.with_edges(own, prune=True)
  elif level == "edge":
    circuit = (g.top_n(n_sel, absolute=_ABSOLUTE.value) if _SELECTION.value == "top_n"
               else g.greedy(n_sel, absolute=_ABSOLUTE.value))
  elif _SELECTION.value != "top_n":
    raise app.UsageError(f"--selection={_SELECTION.value} selects edges; use --level=edge")
  else:
    circuit = levels.top_n(model.cfg, result.scores, n_sel, level, absolute=_ABSOLUTE.value,
                           score_convention=conv)
  sizes = ([G.n_edges_at_percentage(p, n_total) for p in G.MIB_PERCENTAGES] if _CURVE.value == "mib"
           else [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000, n_total])
  sizes = sorted({n for n in sizes + [n_sel] if n <= n_total})
  try:
    if level == "edge":
      curve = V.faithfulness_curve(model.cfg, model.params, dataset, result.scores, n_edges=sizes,
                                   absolute=_ABSOLUTE.value, intervention=_INTERVENTION.value,
                                   batch_size=_BATCH_SIZE.value, ablation=ablation)
    else:
      curve = levels.faithfulness_curve(model.cfg, model.params, dataset, result.scores, level,
                                        counts=sizes, absolute=_ABSOLUTE.value,
                                        score_convention=conv, intervention=_INTERVENTION.value,
                                        batch_size=_BATCH_SIZE.value, ablation=ablation)
  except A.AttributionError as e:
    raise app.UsageError(str(e)) from None
  at = sizes.index(n_sel)
  faith = float(curve.faithfulness[at])
  if own is not None:  # the method's circuit itself, not the top-n by score
    m_own = V.evaluate_circuits(model.cfg, model.params, dataset, circuit.edge_weights(),
                                batch_size=_BATCH_SIZE.value, quiet=True,
                                ablation=ablation or A.make_ablation(
                                    model.cfg, model.params, dataset, _INTERVENTION.value,
                                    _BATCH_SIZE.value))
    faith = float((m_own - curve.m_empty) / (curve.m_full - curve.m_empty))
  node_scores = (A.node_scores(model.cfg, result.scores) if level == "edge" else
                 result.scores if level == "node" else result.scores.sum(1))
  arrays = {}
  boot = None
  if _BOOTSTRAP.value is not None:
    valid = g.valid if level == "edge" else np.ones(result.scores.shape, bool)
    chosen = {"edge": circuit.in_graph, "node": circuit.nodes_in_graph,
              "neuron": circuit.neurons_in_graph}[level]
    arrays = {k: result.extras[k] for k in ("bootstrap_std", "bootstrap_sign_fraction")}
    boot = dict(result.extras["bootstrap"], **bootstrap.summary(
        result.scores, arrays["bootstrap_std"], arrays["bootstrap_sign_fraction"], valid, chosen))

  meta = {"jaxinterp_version": jaxinterp.__version__, "model": _MODEL.value,
          "model_path": os.path.abspath(inputs.resolve_model_path(_MODEL.value)),
          "model_hash": mhash, "task": _TASK.value, "data": _DATA.value,
          "data_path": os.path.abspath(_DATA.value) if _DATA.value else None,
          "data_hash": fp["data_hash"], "metric": _METRIC.value, "method": _METHOD.value, "ig_steps": _IG_STEPS.value,
          "ig_convention": _IG_CONVENTION.value, "intervention": _INTERVENTION.value,
          "n_examples": len(dataset), "batch_size": _BATCH_SIZE.value, "seed": _SEED.value,
          "prepend_bos": _PREPEND_BOS.value, "skip_bad_rows": cli.value("skip_bad_rows", False),
          "top_n": n_sel, "selection": _SELECTION.value, "curve_sizes": _CURVE.value,
          "absolute": _ABSOLUTE.value, "clean_metric": result.clean_metric,
          "faithfulness": faith, "m_full": curve.m_full, "m_empty": curve.m_empty,
          "level": level, convention.KEY: conv, **_method_flags()}
  if boot is not None:
    meta["bootstrap"] = boot
  if level != "edge":  # drawings rank edges: by their sender's node score at node/neuron level
    shown = circuit.replace(scores=np.where(g.valid, node_scores[:, None], 0.0))
    if level == "neuron":
      arrays["neurons_in_graph"] = circuit.neurons_in_graph
  else:
    shown = circuit
  outputs = OUTPUTS + ((OPTIMAL_DIR,) if ablation is not None and not _OPTIMAL_VALUES.value else ())
  phases.start("write")
  with held.writing(outputs):
    files.atomic_savez(os.path.join(out, "scores.npz"), scores=result.scores, valid=g.valid,
                       in_graph=circuit.in_graph, node_scores=node_scores,
                       nodes_in_graph=circuit.nodes_in_graph, meta=np.asarray(json.dumps(meta)),
                       **arrays)
    files.atomic_write_csv(os.path.join(out, "faithfulness.csv"), curve.rows())
    title = f"{_METHOD.value} on {_TASK.value} ({os.path.basename(_MODEL.value.rstrip('/'))})"
    plots.plot_circuit(shown, os.path.join(out, "circuit.png"), title=title)
    plots.plot_faithfulness(curve, os.path.join(out, "faithfulness.png"), title=title)
    viewer.write_html(shown.replace(meta=meta), os.path.join(out, "circuit.html"),
                      curve=curve if level == "edge" else None, title=title,
                      n=n_sel if level == "edge" else circuit.count_edges())
    meta.update(phase_seconds=phases.snapshot(), compile_seconds=phases.compile_by_kind)
    circuit.to_json(os.path.join(out, "graph.json"), meta=meta)  # last: its meta holds the times
  if ckpt:
    ckpt.clear()
  if _MIB_OUT.value:
    model_name = _MIB_MODEL.value or os.path.basename(
        os.path.normpath(inputs.resolve_model_path(_MODEL.value)))
    try:
      folder = G.write_submission(g, _MIB_OUT.value, _TASK.value, model_name,
                                  kind=_MIB_FORMAT.value, absolute=_ABSOLUTE.value)
    except G.GraphError as e:
      raise app.UsageError(f"--mib_out: {e}") from None
    print(f"wrote the MIB submission {folder}")
  phases.stop()

  top = g.ranked_edges(10) if level == "edge" else _ranked(g, result.scores, 10)
  summary = {"top_edges": top, "faithfulness": faith, "n_edges": n_sel, "level": level,
             "n_edges_kept": circuit.count_edges(), "n_nodes": circuit.count_nodes(),
             "m_full": curve.m_full, "m_empty": curve.m_empty, "seconds": time.time() - t0,
             "attribution_seconds": t_attr, "out": out, "phase_seconds": phases.snapshot()}
  print(f"\n{_METHOD.value} ({_INTERVENTION.value}) on {_TASK.value}, {len(dataset)} examples, "
        f"model {_MODEL.value}: {n_total} {level}s")
  print(f"clean metric {curve.m_full:.4f}, empty circuit {curve.m_empty:.4f}")
  what = (f"metric change when the {level} is ablated"
          if A.get_method(_METHOD.value).convention is None else "higher = more important")
  print(f"top {level}s (score = {what}):")
  for name, s in top:
    print(f"  {name:28s} {s:+.4f}")
  if boot is not None:
    sel = boot.get("selected", {})
    print(f"bootstrap ({boot['resamples']} resamples of {boot['n_units']} batches): circuit's mean "
          f"sign stability {sel.get('mean_sign_fraction', float('nan')):.3f}")
  print(f"circuit: top {n_sel} {level}s -> {circuit.count_edges()} edges, {circuit.count_nodes()} "
        f"nodes after pruning; faithfulness {faith:.3f}")
  print(f"wrote {out}/{', '.join(outputs)} ({summary['seconds']:.1f} s)")
  print(f"phases: {phases.line()}")
  return summary


def _method_flags() -> dict:
  """The method- and optimal-ablation flags that were given (for the fingerprint and `meta`)."""
  return {name: flag.value for name, flag in (
      ("tau", _TAU), ("sparsity", _SPARSITY), ("init_from", _INIT_FROM),
      ("mask_steps", _MASK_STEPS), ("mask_lr", _MASK_LR), ("oa_steps", _OA_STEPS), ("oa_lr", _OA_LR),
      ("optimal_values", _OPTIMAL_VALUES)) if flag.value is not None}


def _method_options(method: A.Method):
  """The method's options from the flags (None: `attribute` builds them from its keywords); a
  method-specific flag given to a method without that option is refused."""
  given = {name: flag.value for name, flag in (
      ("tau", _TAU), ("sparsity", _SPARSITY), ("init_from", _INIT_FROM),
      ("mask_steps", _MASK_STEPS), ("mask_lr", _MASK_LR)) if flag.value is not None}
  fields = {f.name for f in dataclasses.fields(method.options)}
  unused = sorted(set(given) - fields)
  if unused:
    raise app.UsageError(f"--{unused[0]} does not apply to --method={method.name}")
  if not given:
    return None
  return method.make_options(ig_steps=_IG_STEPS.value, ig_convention=_IG_CONVENTION.value,
                             remat=_REMAT.value, level=_LEVEL.value, batch_size=_BATCH_SIZE.value,
                             seed=_SEED.value, **given)


def _optimal_ablation(model, dataset: tasks.Dataset, out: str) -> A.Ablation:
  """--intervention=optimal: the learned constants, loaded from --optimal_values or trained on the
  dataset's clean prompts and saved with orbax to --out/optimal_ablation."""
  if _OPTIMAL_VALUES.value:
    return A.make_ablation(model.cfg, model.params, dataset, "optimal", _BATCH_SIZE.value,
                           optimal_values=_OPTIMAL_VALUES.value)
  kw = {k: v for k, v in (("oa_steps", _OA_STEPS.value), ("oa_lr", _OA_LR.value)) if v is not None}
  opts = A.optimal.OptimalOptions(oa_batch=_BATCH_SIZE.value, progress=True, **kw)
  ablation = A.make_ablation(model.cfg, model.params, dataset, "optimal", _BATCH_SIZE.value,
                             optimal_values=opts)
  A.optimal.save_values(os.path.join(out, OPTIMAL_DIR), np.asarray(ablation.means),
                        {"model_hash": inputs.model_hash(model), "task": _TASK.value,
                         "n_examples": len(dataset), **dataclasses.asdict(opts)})
  print(f"optimal ablation: learned constants saved to {os.path.join(out, OPTIMAL_DIR)}")
  return ablation


def _ranked(g, scores, k: int) -> list[tuple[str, float]]:
  """The k best nodes (`a0.h3`) or neurons (`a0.h3[17]`) by |score|, as (name, score)."""
  flat = np.asarray(scores, np.float64).ravel()
  order = np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]
  if scores.ndim == 1:
    return [(g.sender_names[i], float(flat[i])) for i in order]
  d = scores.shape[1]
  return [(f"{g.sender_names[i // d]}[{i % d}]", float(flat[i])) for i in order]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run()


if __name__ == "__main__":
  cli.run(main)
