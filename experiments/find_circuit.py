"""Find a circuit: attribute every edge, select the top edges, evaluate faithfulness, plot.

    python -m experiments.find_circuit            # EAP-IG on the bundled induction model
    python -m experiments.find_circuit --model=/path/to/hf_dir --task=ioi --data=ioi.csv \\
        --method=EAP-IG-inputs --ig_steps=5 --top_n=200 --out=runs/ioi

Writes to --out: graph.json (EAP-IG format, every valid edge with its score; a `meta` section records
the provenance), scores.npz, faithfulness.csv, circuit.png and faithfulness.png. Long runs (the exact
method, or more than --checkpoint_batches batches) checkpoint their partial scores to
--out/.resume with orbax and resume from there when rerun with the same flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from absl import app, flags, logging
import numpy as np

from experiments import common
import jaxinterp
from jaxinterp import attribution as A
from jaxinterp import evaluation as V
from jaxinterp import files
from jaxinterp import graph as G
from jaxinterp import plots
from jaxinterp import tasks

_MODEL = flags.DEFINE_string("model", common.TOY, "HF checkpoint dir, orbax conversion dir, or 'toy'.")
_TASK = flags.DEFINE_string("task", "induction", f"Task: one of {tasks.task_names()}.")
_DATA = flags.DEFINE_string("data", None, "CSV of clean/corrupted prompt pairs (not needed for "
                            "induction).")
_METRIC = flags.DEFINE_enum("metric", "task", list(tasks.METRICS),
                            "Per-example metric: the task's own, KL to the clean run, or "
                            "cross-entropy of the answer.")
_METHOD = flags.DEFINE_enum("method", "EAP-IG-inputs", list(A.METHODS), "Attribution method: " +
                            "; ".join(f"{m.name}: {m.description}" for m in A.METHODS.values()) +
                            ".")
_IG_STEPS = flags.DEFINE_integer("ig_steps", 5, "Integrated-gradient steps m.")
_IG_CONVENTION = flags.DEFINE_enum("ig_convention", "eap", ["eap", "paper"],
                                   "eap: alpha = k/m, k=0..m-1; paper: k=1..m.")
_N_EXAMPLES = flags.DEFINE_integer("n_examples", 64, "Number of examples.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Examples per compiled call.")
_INTERVENTION = flags.DEFINE_enum("intervention", "patching", list(A.INTERVENTIONS),
                                  "How ablated edges are valued.")
_TOP_N = flags.DEFINE_integer("top_n", 20, "Edges in the selected circuit (before pruning).")
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
                            "jaxinterp/sharding.py).")

RESUME_DIR = ".resume"
FINGERPRINT = "fingerprint.json"


# ------------------------------------------------------------------------------ resumable runs


def fingerprint(model_hash: str, dataset: tasks.Dataset) -> dict:
  """What must match for a checkpoint to be resumed."""
  return {"model": _MODEL.value, "model_hash": model_hash, "task": _TASK.value, "data": _DATA.value,
          "data_hash": _data_hash(dataset), "metric": _METRIC.value, "method": _METHOD.value, "ig_steps": _IG_STEPS.value,
          "ig_convention": _IG_CONVENTION.value, "intervention": _INTERVENTION.value,
          "n_examples": _N_EXAMPLES.value, "batch_size": _BATCH_SIZE.value,
          "prepend_bos": _PREPEND_BOS.value, "seed": _SEED.value}


def _data_hash(dataset: tasks.Dataset) -> str:
  import hashlib
  h = hashlib.sha256()
  for a in (dataset.clean, dataset.corrupted, dataset.lengths):
    h.update(np.ascontiguousarray(a).tobytes())
  for k in sorted(dataset.labels):
    h.update(k.encode())
    h.update(np.ascontiguousarray(dataset.labels[k]).tobytes())
  return h.hexdigest()


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
    return A.Progress(next_batch=int(tree["next_batch"]), score_sum=np.asarray(tree["score_sum"]),
                      clean_sum=float(tree["clean_sum"]), seen=int(tree["seen"]))

  def save(self, state: A.Progress) -> None:
    os.makedirs(self.dir, exist_ok=True)
    fp_path = os.path.join(self.dir, FINGERPRINT)
    if not os.path.exists(fp_path):
      files.atomic_write_text(fp_path, json.dumps(self.fp, indent=1))
    old = self._steps()
    tree = {"next_batch": np.int64(state.next_batch), "score_sum": state.score_sum,
            "clean_sum": np.float64(state.clean_sum), "seen": np.int64(state.seen)}
    self.ckptr.save(os.path.join(self.dir, f"step_{state.next_batch:06d}"), tree, force=True)
    for s in old:
      if s != state.next_batch:
        shutil.rmtree(os.path.join(self.dir, f"step_{s:06d}"), ignore_errors=True)

  def clear(self) -> None:
    shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- main


def run(argv=None) -> dict:
  """Run with the current flags; returns the summary dict (also used by tests)."""
  t0 = time.time()
  out = common.ensure_out_dir(_OUT.value)
  if _N_EXAMPLES.value < 1 or _BATCH_SIZE.value < 1 or _IG_STEPS.value < 1 or _TOP_N.value < 0:
    raise app.UsageError("--n_examples, --batch_size and --ig_steps must be >= 1, --top_n >= 0")
  model = common.load_model(_MODEL.value)
  dataset = common.load_dataset(model, _MODEL.value, _TASK.value, _DATA.value, _N_EXAMPLES.value,
                                _PREPEND_BOS.value, _SEED.value)
  dataset = dataclasses.replace(dataset, task=tasks.with_metric(dataset.task, _METRIC.value))
  mhash = common.model_hash(model)
  fp = fingerprint(mhash, dataset)
  n_batches = -(-len(dataset) // _BATCH_SIZE.value)
  ckpt = None
  if _METHOD.value == "exact" or n_batches > _CHECKPOINT_BATCHES.value:
    ckpt = Checkpointer(out, fp)
  resume = ckpt.load() if ckpt else None
  if resume is not None:
    logging.info("resuming from batch %d of %d", resume.next_batch, n_batches)
    print(f"resuming from checkpoint: batch {resume.next_batch} of {n_batches}")
  params, batch_fn = model.params, None
  if _MESH.value:
    from jaxinterp import sharding
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
  try:
    result = A.attribute(model.cfg, params, dataset, method=_METHOD.value,
                         intervention=_INTERVENTION.value, ig_steps=_IG_STEPS.value,
                         batch_size=_BATCH_SIZE.value, ig_convention=_IG_CONVENTION.value,
                         remat=_REMAT.value, resume=resume,
                         on_batch=ckpt.save if ckpt else None, batch_fn=batch_fn)
  except A.AttributionError as e:
    raise app.UsageError(str(e)) from None
  t_attr = time.time() - t0

  g = G.Graph.from_config(model.cfg, result.scores)
  n_sel = min(_TOP_N.value, g.n_edges)
  circuit = (g.top_n(n_sel, absolute=_ABSOLUTE.value) if _SELECTION.value == "top_n"
             else g.greedy(n_sel, absolute=_ABSOLUTE.value))
  sizes = sorted({n for n in [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000,
                              n_sel, g.n_edges] if n <= g.n_edges})
  try:
    curve = V.faithfulness_curve(model.cfg, model.params, dataset, result.scores, n_edges=sizes,
                                 absolute=_ABSOLUTE.value, intervention=_INTERVENTION.value,
                                 batch_size=_BATCH_SIZE.value)
  except A.AttributionError as e:
    raise app.UsageError(str(e)) from None
  at = sizes.index(n_sel)
  faith = float(curve.faithfulness[at])

  meta = {"jaxinterp_version": jaxinterp.__version__, "model": _MODEL.value,
          "model_path": os.path.abspath(common.resolve_model_path(_MODEL.value)),
          "model_hash": mhash, "task": _TASK.value, "data": _DATA.value,
          "data_hash": fp["data_hash"], "metric": _METRIC.value, "method": _METHOD.value, "ig_steps": _IG_STEPS.value,
          "ig_convention": _IG_CONVENTION.value, "intervention": _INTERVENTION.value,
          "n_examples": len(dataset), "batch_size": _BATCH_SIZE.value, "seed": _SEED.value,
          "prepend_bos": _PREPEND_BOS.value, "top_n": n_sel, "selection": _SELECTION.value,
          "absolute": _ABSOLUTE.value, "clean_metric": result.clean_metric,
          "faithfulness": faith, "m_full": curve.m_full, "m_empty": curve.m_empty}
  circuit.to_json(os.path.join(out, "graph.json"), meta=meta)
  files.atomic_savez(os.path.join(out, "scores.npz"), scores=result.scores, valid=g.valid,
                     in_graph=circuit.in_graph, node_scores=A.node_scores(model.cfg, result.scores),
                     meta=np.asarray(json.dumps(meta)))
  files.atomic_write_csv(os.path.join(out, "faithfulness.csv"), curve.rows())
  title = f"{_METHOD.value} on {_TASK.value} ({os.path.basename(_MODEL.value.rstrip('/'))})"
  plots.plot_circuit(circuit, os.path.join(out, "circuit.png"), title=title)
  plots.plot_faithfulness(curve, os.path.join(out, "faithfulness.png"), title=title)
  if ckpt:
    ckpt.clear()

  top = g.ranked_edges(10)
  summary = {"top_edges": top, "faithfulness": faith, "n_edges": n_sel,
             "n_edges_kept": circuit.count_edges(), "n_nodes": circuit.count_nodes(),
             "m_full": curve.m_full, "m_empty": curve.m_empty, "seconds": time.time() - t0,
             "attribution_seconds": t_attr, "out": out}
  print(f"\n{_METHOD.value} ({_INTERVENTION.value}) on {_TASK.value}, {len(dataset)} examples, "
        f"model {_MODEL.value}: {g.n_edges} edges")
  print(f"clean metric {curve.m_full:.4f}, empty circuit {curve.m_empty:.4f}")
  print("top edges (score = metric change when the edge is ablated):")
  for name, s in top:
    print(f"  {name:28s} {s:+.4f}")
  print(f"circuit: top {n_sel} edges -> {circuit.count_edges()} edges, {circuit.count_nodes()} nodes "
        f"after pruning; faithfulness {faith:.3f}")
  print(f"wrote {out}/graph.json, scores.npz, faithfulness.csv, circuit.png, faithfulness.png "
        f"({summary['seconds']:.1f} s)")
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run()


if __name__ == "__main__":
  app.run(main)
