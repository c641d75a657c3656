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
and faithfulness.png (sizes in span edges), circuit.png (the first
`viz.span_plot.MAX_DRAWN_SPAN_EDGES` of the circuit, one column per span, labelled with row 0's
token ids in it).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from jaxinterp import attribution as A
from jaxinterp import models, tasks
from jaxinterp.attribution import positions as attr_positions
from jaxinterp.circuits import schemas as S
from jaxinterp.circuits import span_circuits as SC
from jaxinterp.discovery import positions
from jaxinterp.discovery.config import TOP_N, FindCircuitConfig
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.evaluation import position_circuits as PC
from jaxinterp.evaluation import task_check
from jaxinterp.runtime import files, inputs, timing
from jaxinterp.viz import span_plot

OUTPUTS = ("graph.json", "spans.npz", "circuit.png", "faithfulness.csv", "faithfulness.png")


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
  ctx = positions.Context(config, options, held, phases, model, dataset, checked, t0)
  out, how = held.path, config.span_aggregation or "sum"
  positions.check_model(model, config.intervention)
  schema = S.get_schema(config.schema, config.prepend_bos)
  try:
    spans = S.dataset_spans(schema, dataset)  # [row, span, 2]
  except S.SchemaError as e:
    raise inputs.InputError(f"--schema={config.schema}: {e}") from None
  phases.start("attribute")
  ablation = A.make_ablation(model.cfg, model.params, dataset, config.intervention,
                             config.batch_size)
  rows = attr_positions.attribute_position_rows(
      model.cfg, model.params, dataset, config.method, intervention=config.intervention,
      batch_size=config.batch_size, ablation=ablation, **positions.kernel_options(ctx))
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
  n_pos = int(np.shape(dataset.clean)[1])
  meta = positions.curve_meta(ctx, curve, faith, settings={"span_aggregation": how}, counts={
      "n_pos": n_pos, "spans": list(scores.names), "n_span_edges": n_total, "top_n": n_sel})
  phases.start("write")
  with held.writing(OUTPUTS):
    SC.to_npz(scores, os.path.join(out, "spans.npz"))
    meta = positions.write_curve(
        ctx, curve, meta, unit="span edges",
        title=f"{config.method} on {config.task}, {config.schema} spans ({how})")
    SC.to_json(scores, os.path.join(out, "graph.json"), edges=chosen, meta=meta)
    row = [str(int(t)) for t in np.asarray(next(dataset.batches(1)).clean)[0, :n_pos]]
    span_plot.plot_span_circuit(  # row 0's token ids under each span's name
        scores, chosen, os.path.join(out, "circuit.png"),
        tokens=span_plot.span_tokens(spans[0], row),
        title=f"{config.method} on {config.task}, {config.schema} spans ({how}; under each span: "
        f"row 0's token ids)")
  phases.stop()
  lay = scores.layout
  top = [(S.span_edge_name(lay, scores.names, *e[:4]), e[4]) for e in chosen[:10]]
  return positions.report(
      ctx, curve, top, n_sel=n_sel, faith=faith, t_attr=t_attr, unit="span edges", width=44,
      header=f"{n_total} span edges over the {config.schema} schema's {len(scores.names)} spans "
      f"({how} over positions)", conv=scores.convention, outputs=OUTPUTS, fields={
          "schema": config.schema, "span_aggregation": how, "spans": list(scores.names),
          "n_edges_kept": len(chosen), "n_span_edges": n_total, "n_pos": n_pos})
