"""`find_circuit --level=position`: a circuit of position edges, and the tail it shares with spans.

`pipeline.find_circuit` hands a position-level run here (`run`) after loading the model and the
data and checking the task; with `--schema` it hands it to `discovery.spans` instead, which builds
on this module's shared pieces. The position edges' scores come from
`attribution.positions.attribute_positions`; the circuit is the top_n position edges by score
(`PositionScores.select`) and the faithfulness curve ablates the position edges outside each
top-n circuit (`evaluation.position_circuits.faithfulness_curve`).

Outputs: positions.npz (every position edge's score, graph.json's sign), graph.json (the circuit's
position edges by name, `a0.h3@5->a1.h0<k>@9`), faithfulness.csv and faithfulness.png (sizes in
position edges), circuit.png (the first `MAX_DRAWN_POSITION_EDGES` of the circuit over row 0's
tokens) and circuit.html (the interactive circuit.png).

Shared with the span level: `Context` (a run's settings and state), `check_model`, `kernel_options`,
`curve_meta` (graph.json's `meta`), `write_curve` (faithfulness.csv and .png, the phase timings)
and `report` (the printed report and the returned summary).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

import jaxinterp
from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import positions as attr_positions
from jaxinterp.circuits import convention
from jaxinterp.circuits import positions as circuit_positions
from jaxinterp.discovery.config import TOP_N, FindCircuitConfig, record
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.evaluation import position_circuits as PC
from jaxinterp.evaluation import task_check
from jaxinterp.runtime import files, inputs, timing
from jaxinterp.viz import plots, position_plot, position_viewer

MAX_DRAWN_POSITION_EDGES = 40  # circuit.png at --level=position draws at most these
POSITION_OUTPUTS = ("graph.json", "positions.npz", "circuit.png", "faithfulness.csv",
                    "faithfulness.png", "circuit.html")  # --level=position


@dataclasses.dataclass(frozen=True)
class Context:
  """A position- or span-level run as `pipeline` hands it over: its settings, its run directory
  and phase timer, the model and the (checked, possibly filtered) data, the task check's summary
  and the start time."""
  config: FindCircuitConfig
  options: A.Options
  held: files.RunDir
  phases: timing.Phases
  model: models.Model
  dataset: tasks.Dataset
  checked: dict
  t0: float


def check(config: FindCircuitConfig) -> None:
  """InputError (one line) for a setting --level=position (or --schema) cannot take: a method
  without position-level scores, --mesh, --bootstrap, --intervention=optimal."""
  if config.method not in attr_positions.METHODS:
    raise inputs.InputError(f"--level=position works with --method="
                            f"{', '.join(attr_positions.METHODS)}, not {config.method}")
  for name, why in (("mesh", "shards edge-level attribution"),
                    ("bootstrap", "resamples edge, node or neuron scores")):
    if getattr(config, name):
      raise inputs.InputError(f"--{name} {why}; --level=position runs without it")
  if config.intervention == "optimal":
    raise inputs.InputError("--intervention=optimal works with --level=edge, node or neuron, "
                            "not position")


def check_model(model: models.Model, intervention: str) -> None:
  """InputError (one line) for a model the position circuit forward cannot take, before any
  work."""
  try:
    PC.check(model.cfg, intervention)
  except A.AttributionError as e:
    raise inputs.InputError(f"--level=position: {e}") from None


def kernel_options(ctx: Context) -> dict:
  """The method's option values for the position-level kernels (all but `level`)."""
  method = A.get_method(ctx.config.method)
  return {k: v for k, v in method.option_values(ctx.options).items() if k != "level"}


def curve_meta(ctx: Context, curve: V.FaithfulnessCurve, faith: float, *, counts: dict,
               settings: dict | None = None) -> dict:
  """graph.json's `meta` of a position- or span-level run: the run's record and option values,
  `settings` (level-specific ones), where the model and the data come from, `counts` (sizes,
  top_n, ...), the circuit's faithfulness, the curve's ends, the task check and the sign."""
  config, model, dataset = ctx.config, ctx.model, ctx.dataset
  return {"jaxinterp_version": jaxinterp.__version__, **record(config),
          **A.get_method(config.method).option_values(ctx.options), **(settings or {}),
          "model_path": os.path.abspath(inputs.resolve_model_path(config.model)),
          "model_hash": inputs.model_hash(model),
          "data_path": os.path.abspath(config.data) if config.data else None,
          "data_hash": inputs.dataset_hash(dataset), "n_examples": len(dataset), **counts,
          "faithfulness": faith, "m_full": curve.m_full, "m_empty": curve.m_empty,
          "task_check": ctx.checked, convention.KEY: convention.LOSS}


def write_curve(ctx: Context, curve: V.FaithfulnessCurve, meta: dict, *, title: str,
                unit: str) -> dict:
  """Write faithfulness.csv and faithfulness.png (circuit sizes: the top-n `unit`, e.g. "span
  edges") into the run directory; returns `meta` with the phase timings so far added."""
  out = ctx.held.path
  files.atomic_write_csv(os.path.join(out, "faithfulness.csv"), curve.rows())
  plots.plot_faithfulness(
      curve, os.path.join(out, "faithfulness.png"), title=title, label=f"circuit (top-n {unit})",
      xlabel=f"circuit size n: top-n {unit} by "
      f"{'|score|' if ctx.config.absolute else 'signed importance'} (no pruning)")
  return dict(meta, phase_seconds=ctx.phases.snapshot(),
              compile_seconds=ctx.phases.compile_by_kind)


def report(ctx: Context, curve: V.FaithfulnessCurve, top: list[tuple[str, float]], *, n_sel: int,
           faith: float, t_attr: float, header: str, unit: str, width: int, conv: str,
           outputs: tuple[str, ...], fields: dict) -> dict:
  """Print the run's report (`header` after the model's name; the `top` edges' names padded to
  `width`, displayed in `conv`'s sign) and return find_circuit's summary with `fields` added."""
  config, phases, out = ctx.config, ctx.phases, ctx.held.path
  print(f"\n{config.method} ({config.intervention}) on {config.task}, {len(ctx.dataset)} "
        f"examples, model {config.model}: {header}")
  print(f"clean metric {curve.m_full:.4f}, empty circuit {curve.m_empty:.4f}")
  print(f"top {unit} (score: {convention.DISPLAYED}):")
  for name, s in top:
    print(f"  {name:{width}s} {convention.displayed(s, conv):+.4f}")
  print(f"circuit: top {n_sel} {unit}; faithfulness {faith:.3f}")
  print(f"wrote {out}/{', '.join(outputs)} ({time.time() - ctx.t0:.1f} s)")
  print(f"phases: {phases.line()}")
  return {"top_edges": top, "faithfulness": faith, "n_edges": n_sel, "level": "position",
          **fields, "m_full": curve.m_full, "m_empty": curve.m_empty,
          "seconds": time.time() - ctx.t0, "attribution_seconds": t_attr, "out": out,
          "phase_seconds": phases.snapshot(), "task_check": ctx.checked}


def run(config: FindCircuitConfig, options: A.Options, held: files.RunDir, phases: timing.Phases,
        model: models.Model, dataset: tasks.Dataset, checked: dict, t0: float) -> dict:
  """The position-level run (the module docstring); returns find_circuit's summary, with
  `n_position_edges`, `n_pos` and `clean_metric` added."""
  ctx, out = Context(config, options, held, phases, model, dataset, checked, t0), held.path
  check_model(model, config.intervention)
  phases.start("attribute")
  result = attr_positions.attribute_positions(
      model.cfg, model.params, dataset, config.method, intervention=config.intervention,
      batch_size=config.batch_size, **kernel_options(ctx))
  t_attr = time.time() - t0
  scores = result.scores
  n_total = scores.n_edges
  n_sel = min(TOP_N if config.top_n is None else config.top_n, n_total)
  chosen = scores.select(n_sel, absolute=config.absolute)
  phases.start("curve")
  sizes = V.curve_sizes(config.curve_sizes, n_total, [n_sel])
  curve = PC.faithfulness_curve(model.cfg, model.params, dataset, scores, n_edges=sizes,
                                absolute=config.absolute, intervention=config.intervention,
                                batch_size=config.batch_size)
  faith = float(curve.faithfulness[sizes.index(n_sel)])
  task_check.warn_empty(checked, curve.m_full, curve.m_empty, dataset.task.higher_is_better)
  meta = curve_meta(ctx, curve, faith, counts={
      "n_pos": scores.n_pos, "n_position_edges": n_total, "top_n": n_sel,
      "clean_metric": result.clean_metric})
  phases.start("write")
  with held.writing(POSITION_OUTPUTS):
    circuit_positions.to_npz(scores, os.path.join(out, "positions.npz"))
    meta = write_curve(ctx, curve, meta, unit="position edges",
                       title=f"{config.method} on {config.task}, position level")
    circuit_positions.to_json(scores, os.path.join(out, "graph.json"), edges=chosen, meta=meta)
    row = [str(int(t)) for t in np.asarray(next(dataset.batches(1)).clean)[0, :scores.n_pos]]
    position_plot.plot_position_circuit(  # row 0's token ids label the columns
        scores, chosen[:MAX_DRAWN_POSITION_EDGES], os.path.join(out, "circuit.png"),
        tokens=row + [""] * (scores.n_pos - len(row)),
        title=f"{config.method} on {config.task}, position level (columns: row 0's token ids)")
    position_viewer.write_html(os.path.join(out, "graph.json"), os.path.join(out, "circuit.html"),
                               tokens=row)  # the interactive circuit.png
  phases.stop()
  return report(ctx, curve, scores.names(chosen[:10]), n_sel=n_sel, faith=faith, t_attr=t_attr,
                header=f"{n_total} position edges over {scores.n_pos} positions",
                unit="position edges", width=36, conv=scores.convention,
                outputs=POSITION_OUTPUTS, fields={
                    "n_edges_kept": len(chosen), "n_position_edges": n_total,
                    "n_pos": scores.n_pos, "clean_metric": result.clean_metric})
