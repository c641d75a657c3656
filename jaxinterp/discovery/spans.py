"""`find_circuit --level=position --schema=NAME`: a span-level circuit instead of a position one.

Each row's spans come from the bundled schema (`circuits.schemas.SCHEMAS`: induction, ioi); each
row's position-level scores (`attribution.positions.attribute_position_rows`, one ablation built on
the whole dataset) are aggregated over its spans by `span_aggregation` (sum, mean, max_abs) and
averaged over rows (`schemas.aggregate`). The circuit is the top_n span edges
(`circuits.span_circuits.select`); the faithfulness curve evaluates the top-n span circuits of the
curve's sizes, each span edge ablated at exactly the position edges it covers in each row
(`evaluation.position_circuits.span_faithfulness_curve`).

Outputs (instead of the position level's): graph.json (the circuit's span edges by name,
`a0.h3@after_first_A->a1.h0<k>@last`, graph.json's sign; the span names, the schema and the
aggregation in the header and in `meta`), spans.npz (every span edge's score), faithfulness.csv
and faithfulness.png (sizes in span edges). No circuit.png: span circuits are not drawn yet.
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
from jaxinterp.circuits import schemas as S
from jaxinterp.circuits import span_circuits as SC
from jaxinterp.discovery.config import TOP_N, FindCircuitConfig, record
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.evaluation import position_circuits as PC
from jaxinterp.evaluation import task_check
from jaxinterp.runtime import files, inputs, timing
from jaxinterp.viz import plots

OUTPUTS = ("graph.json", "spans.npz", "faithfulness.csv", "faithfulness.png")


def check(config: FindCircuitConfig, level: str) -> None:
  """InputError (one line) for --schema or --span_aggregation settings a run cannot take: a schema
  without --level=position, an unknown schema or aggregation, an aggregation without a schema."""
  if config.schema is None:
    if config.span_aggregation is not None:
      raise inputs.InputError("--span_aggregation aggregates position scores over --schema's "
                              "spans; give --schema")
    return
  if level != "position":
    raise inputs.InputError(f"--schema groups position edges into spans: it needs "
                            f"--level=position, not {level}")
  if config.schema not in S.SCHEMAS:
    raise inputs.InputError(f"--schema={config.schema}: unknown schema; choose from "
                            f"{', '.join(S.SCHEMAS)}")
  if (config.span_aggregation or "sum") not in S.AGGREGATIONS:
    raise inputs.InputError(f"--span_aggregation={config.span_aggregation}: choose from "
                            f"{', '.join(S.AGGREGATIONS)}")


def run(config: FindCircuitConfig, options: A.Options, held: files.RunDir, phases: timing.Phases,
        model: models.Model, dataset: tasks.Dataset, checked: dict, t0: float) -> dict:
  """The span-level run (the module docstring); returns find_circuit's summary, with `schema`,
  `span_aggregation`, `n_span_edges` and `spans` (the span names) added."""
  out, how = held.path, config.span_aggregation or "sum"
  method = A.get_method(config.method)
  schema = S.get_schema(config.schema, config.prepend_bos)
  try:
    spans = S.dataset_spans(schema, dataset)  # [row, span, 2]
  except S.SchemaError as e:
    raise inputs.InputError(f"--schema={config.schema}: {e}") from None
  phases.start("attribute")
  kernel_options = {k: v for k, v in method.option_values(options).items() if k != "level"}
  ablation = A.make_ablation(model.cfg, model.params, dataset, config.intervention,
                             config.batch_size)
  rows = attr_positions.attribute_position_rows(
      model.cfg, model.params, dataset, config.method, intervention=config.intervention,
      batch_size=config.batch_size, ablation=ablation, **kernel_options)
  scores = dataclasses.replace(S.aggregate(rows, spans, schema, how), schema=config.schema)
  t_attr = time.time() - t0
  n_total = SC.n_edges(scores)
  n_sel = min(TOP_N if config.top_n is None else config.top_n, n_total)
  chosen = SC.select(scores, n_sel, absolute=config.absolute)
  phases.start("curve")
  sizes = V.curve_sizes(config.curve_sizes, n_total, [n_sel])
  curve = PC.span_faithfulness_curve(model.cfg, model.params, dataset, scores, spans,
                                     n_edges=sizes, absolute=config.absolute,
                                     intervention=config.intervention,
                                     batch_size=config.batch_size, ablation=ablation)
  faith = float(curve.faithfulness[sizes.index(n_sel)])
  task_check.warn_empty(checked, curve.m_full, curve.m_empty, dataset.task.higher_is_better)
  meta = {"jaxinterp_version": jaxinterp.__version__, **record(config),
          **method.option_values(options), "span_aggregation": how,
          "model_path": os.path.abspath(inputs.resolve_model_path(config.model)),
          "model_hash": inputs.model_hash(model),
          "data_path": os.path.abspath(config.data) if config.data else None,
          "data_hash": inputs.dataset_hash(dataset), "n_examples": len(dataset),
          "n_pos": int(dataset.clean.shape[1]), "spans": list(scores.names),
          "n_span_edges": n_total, "top_n": n_sel, "faithfulness": faith,
          "m_full": curve.m_full, "m_empty": curve.m_empty, "task_check": checked,
          convention.KEY: convention.LOSS}
  phases.start("write")
  with held.writing(OUTPUTS):
    SC.to_npz(scores, os.path.join(out, "spans.npz"))
    files.atomic_write_csv(os.path.join(out, "faithfulness.csv"), curve.rows())
    plots.plot_faithfulness(
        curve, os.path.join(out, "faithfulness.png"),
        title=f"{config.method} on {config.task}, {config.schema} spans ({how})",
        label="circuit (top-n span edges)", xlabel="circuit size n: top-n span edges by "
        f"{'|score|' if config.absolute else 'signed importance'} (no pruning)")
    meta.update(phase_seconds=phases.snapshot(), compile_seconds=phases.compile_by_kind)
    SC.to_json(scores, os.path.join(out, "graph.json"), edges=chosen, meta=meta)
  phases.stop()
  lay = scores.layout
  top = [(S.span_edge_name(lay, scores.names, *e[:4]), e[4]) for e in chosen[:10]]
  print(f"\n{config.method} ({config.intervention}) on {config.task}, {len(dataset)} examples, "
        f"model {config.model}: {n_total} span edges over the {config.schema} schema's "
        f"{len(scores.names)} spans ({how} over positions)")
  print(f"clean metric {curve.m_full:.4f}, empty circuit {curve.m_empty:.4f}")
  print(f"top span edges (score: {convention.DISPLAYED}):")
  for name, s in top:
    print(f"  {name:44s} {convention.displayed(s, scores.convention):+.4f}")
  print(f"circuit: top {n_sel} span edges; faithfulness {faith:.3f}")
  print(f"wrote {out}/{', '.join(OUTPUTS)} ({time.time() - t0:.1f} s)")
  print(f"phases: {phases.line()}")
  return {"top_edges": top, "faithfulness": faith, "n_edges": n_sel, "level": "position",
          "schema": config.schema, "span_aggregation": how, "spans": list(scores.names),
          "n_edges_kept": len(chosen), "n_span_edges": n_total, "n_pos": int(
              np.shape(dataset.clean)[1]), "m_full": curve.m_full, "m_empty": curve.m_empty,
          "seconds": time.time() - t0, "attribution_seconds": t_attr, "out": out,
          "phase_seconds": phases.snapshot(), "task_check": checked}
