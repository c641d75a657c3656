"""A saved position- or span-level circuit evaluated: `evaluate_circuit`'s numbers and files for a
graph.json written by `find_circuit --level=position` (with `--schema`: the span level).

`graph_level(path)` tells the levels apart by the graph.json's `format` (`circuits.positions.FORMAT`
or `circuits.span_circuits.FORMAT`; anything else is an edge graph). `load` reads the circuit as
stored (graph.json's edges, in its order) and every edge's score from the `positions.npz` /
`spans.npz` find_circuit wrote beside it (checked to agree with graph.json's scores); without that
file only graph.json's own edges are scored (a warning says so), so the curve then ranks the rest
as ties at 0.

`evaluate` computes what find_circuit computed for the same circuit, with the library calls it
uses: the circuit's faithfulness `(m(C) - m(empty)) / (m(full) - m(empty))`, the faithfulness curve
of the top-n position (span) circuits at the sizes of the run's `curve_sizes` (the circuit's size
among them, ranked by |score| or signed importance as the run's `absolute`;
`position_circuits.faithfulness_curve`, `span_faithfulness_curve`), so the rows equal the run's
faithfulness.csv; and MIB's CPR (signed ranking) and CMD (|score| ranking) over circuits of
`circuits.MIB_PERCENTAGES` of the position (span) edges. Position circuits are not pruned.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxinterp import circuits as G
from jaxinterp import tasks
from jaxinterp.attribution import Ablation, AttributionError, make_ablation
from jaxinterp.circuits import positions as cpos
from jaxinterp.circuits import schemas as S
from jaxinterp.circuits import span_circuits as SC
from jaxinterp.circuits.layout import shape_key
from jaxinterp.evaluation import faithfulness as V
from jaxinterp.evaluation import position_circuits as PC
from jaxinterp.models import Model
from jaxinterp.runtime import files, inputs
from jaxinterp.viz import plots, position_plot, position_viewer, span_plot

SCORES_FILE = {"position": "positions.npz", "span": "spans.npz"}  # every score, beside graph.json
OUTPUTS = {"position": ("evaluation.json", "faithfulness.csv", "faithfulness.png", "circuit.png",
                        "circuit.html"),
           "span": ("evaluation.json", "faithfulness.csv", "faithfulness.png", "circuit.png")}
MAX_DRAWN = 40  # circuit.png draws at most these position edges (as find_circuit's)
# Row = (sender, sender position or span, receiver, receiver position or span, score).
Row = tuple[int, int, int, int, float]


def graph_level(path: str) -> str:
  """"position", "span" or "edge": the level of the graph.json at `path`, by its `format` (an
  unreadable file is "edge": the edge-level reader reports it)."""
  try:
    with open(path) as f:
      fmt = json.load(f).get("format")
  except (OSError, ValueError, AttributeError):
    return "edge"
  return {cpos.FORMAT: "position", SC.FORMAT: "span"}.get(fmt, "edge")


def check_flags(level: str, *, protocol: str, mib_level: str, log_scale: bool,
                mib_absolute: bool, compare_level: str | None) -> None:
  """InputError (one line, naming the flag) for a setting a `level` graph cannot take: MIB's
  edge-level protocol and its options at the position and span levels, and a `--compare` graph of
  another level than `--graph`'s."""
  if compare_level is not None and compare_level != level:
    raise inputs.InputError(f"--compare is {_a(compare_level)}-level graph and --graph "
                            f"{_a(level)}-level one: circuits are compared at one level")
  if level == "edge":
    return
  for flag, given in (("--protocol=mib", protocol == "mib"),
                      (f"--mib_level={mib_level}", mib_level != "edge"),
                      ("--log_scale", log_scale), ("--mib_absolute", mib_absolute)):
    if given:
      raise inputs.InputError(f"{flag}: MIB's protocol ranks edge-level graphs; --graph is "
                              f"{_a(level)}-level one (its CPR and CMD are over {level} edges)")


def _a(level: str) -> str:
  return f"{'an' if level == 'edge' else 'a'} {level}"


@dataclasses.dataclass(frozen=True)
class SavedCircuit:
  """A position or span circuit as find_circuit saved it.

  Attributes:
    level: "position" or "span".
    scores: every edge's score (`PositionScores` or `SpanScores`, the `loss` convention).
    edges: the circuit as graph.json stores it, in its order (`Row`s).
    scores_file: where `scores` came from (the .npz beside graph.json, or graph.json itself).
  """

  level: str
  scores: Any
  edges: list[Row]
  scores_file: str

  @property
  def n_edges_total(self) -> int:
    return self.scores.n_edges if self.level == "position" else SC.n_edges(self.scores)

  def select(self, n: int, absolute: bool) -> list[Row]:
    """The top-n edges (`PositionScores.select` / `span_circuits.select`)."""
    if self.level == "position":
      return self.scores.select(n, absolute=absolute)
    return SC.select(self.scores, n, absolute=absolute)

  def names(self, rows: Sequence[Row]) -> list[str]:
    """The rows' edge names, as graph.json writes them."""
    lay = self.scores.layout
    if self.level == "position":
      return [cpos.edge_name(lay, *r[:4]) for r in rows]
    return [S.span_edge_name(lay, self.scores.names, *r[:4]) for r in rows]


def _score_at(scores, level: str, row: Sequence[int]) -> np.float32:
  s, a, r, b = row[:4]
  kv = {int(x): c for c, x in enumerate(cpos.kv_receivers(scores.shape))}
  if r not in kv:
    return scores.local[a, s, r]
  if level == "position":
    return scores.crossing[cpos.pair_index(b, a), s, kv[r]]
  return scores.crossing[a, b, s, kv[r]]


def load(path: str, cfg, what: str) -> SavedCircuit:
  """The position or span circuit of the graph.json at `path` and every edge's score (the module
  docstring), checked against the model `cfg`; InputError naming `what` (the flag) otherwise."""
  level = graph_level(path)
  reader = {"position": (cpos.from_json, cpos.from_npz), "span": (SC.from_json, SC.from_npz)}
  if level not in reader:
    raise inputs.InputError(f"{what}: {path} is not a position- or span-level graph.json")
  from_json, from_npz = reader[level]
  try:
    stored = from_json(path)
    with open(path) as f:
      named = dict(json.load(f)["edges"])
    lay = stored.layout
    rows = [(*(cpos.parse_edge_name(lay, n) if level == "position" else
               SC.parse_edge_name(lay, stored.names, n)), float(v)) for n, v in named.items()]
  except (G.GraphError, KeyError, TypeError, ValueError) as e:
    raise inputs.InputError(f"{what}: {e}") from None
  if (lay.n_layers, lay.n_heads, lay.parallel) != shape_key(cfg):
    raise inputs.InputError(f"{what}: a graph of {lay.describe()}; the model has n_layers="
                            f"{cfg.n_layers}, n_heads={cfg.n_heads}, parallel_attn_mlp="
                            f"{getattr(cfg, 'parallel_attn_mlp', False)}")
  npz = os.path.join(os.path.dirname(os.path.abspath(path)), SCORES_FILE[level])
  if not os.path.exists(npz):
    inputs.warn(f"{what}: no {SCORES_FILE[level]} beside {os.path.basename(path)}: only its "
                f"{len(rows)} edges are scored, the curve and CPR/CMD rank the others as 0")
    return SavedCircuit(level, stored, rows, os.path.abspath(path))
  try:
    every = from_npz(npz)
  except G.GraphError as e:
    raise inputs.InputError(f"{what}: {e}") from None
  same = (every.local.shape == stored.local.shape and every.crossing.shape == stored.crossing.shape
          and (level == "position" or every.names == stored.names)
          and all(_score_at(every, level, r) == np.float32(r[4]) for r in rows))
  if not same:
    raise inputs.InputError(f"{what}: {npz} holds other scores than {os.path.basename(path)} "
                            f"(from another run?)")
  return SavedCircuit(level, every, rows, npz)


def span_mib_scores(cfg, params, dataset: tasks.Dataset, scores, spans: np.ndarray, **kw
                    ) -> dict[str, float]:
  """MIB's CPR (signed ranking) and CMD (|score| ranking) of span circuits of
  `circuits.MIB_PERCENTAGES` of the span edges, as `position_circuits.mib_scores` for position
  edges; keywords as `position_circuits.evaluate_position_circuits`."""
  pcts = list(G.MIB_PERCENTAGES)
  counts = G.mib.sizes_and_percentages(SC.n_edges(scores), percentages=pcts)[0]
  signed, absolute = (PC.span_faithfulness_curve(cfg, params, dataset, scores, spans,
                                                 n_edges=counts, absolute=a, **kw)
                      for a in (False, True))
  return {"CPR": G.cpr(pcts, signed.faithfulness), "CMD": G.cmd(pcts, absolute.faithfulness)}


def dataset_spans(saved: SavedCircuit, dataset: tasks.Dataset, prepend_bos: bool) -> np.ndarray:
  """Int [row, span, 2]: each row's spans under the schema the span circuit was found with."""
  name = saved.scores.schema
  try:
    schema = S.get_schema(name, prepend_bos)
    if tuple(schema.names) != tuple(saved.scores.names):
      raise S.SchemaError(f"spans {tuple(schema.names)}, the graph's {saved.scores.names}")
    return S.dataset_spans(schema, dataset)
  except (S.SchemaError, KeyError, ValueError) as e:
    raise inputs.InputError(f"--graph: its schema {name!r}: {e}") from None


def evaluate(model: Model, saved: SavedCircuit, dataset: tasks.Dataset, *, intervention: str,
             batch_size: int, absolute: bool = True, curve_sizes: str = "counts",
             top_n: int | None = None, prepend_bos: bool = True,
             compare: SavedCircuit | None = None, ablation: Ablation | None = None
             ) -> tuple[dict, V.FaithfulnessCurve, list[Row]]:
  """All numbers of the report: (summary dict, the faithfulness curve, the circuit's rows).

  The circuit is graph.json's, or the top `top_n` edges (ranked as `absolute`). The curve's sizes
  are `faithfulness.curve_sizes(curve_sizes, n_total, [circuit size])`; all circuits share one
  ablation: `ablation` (built by the caller, e.g. loaded optimal-ablation constants), else the one
  `make_ablation` builds for `intervention`. InputError (one line) for a circuit the data or the
  model cannot take.
  """
  cfg, params = model.cfg, model.params
  try:
    circuit = saved.edges if top_n is None else saved.select(top_n, absolute)
  except G.GraphError as e:
    raise inputs.InputError(f"--top_n: {e}") from None
  n_pos = int(dataset.clean.shape[1])
  if saved.level == "position" and saved.scores.n_pos != n_pos:
    raise inputs.InputError(f"--graph: its position edges span {saved.scores.n_pos} positions, "
                            f"the data's prompts {n_pos} (found on other data?)")
  try:
    PC.check(cfg, intervention)
  except AttributionError as e:
    raise inputs.InputError(f"--intervention={intervention}: {e}") from None
  try:
    sizes = V.curve_sizes(curve_sizes, saved.n_edges_total, [len(circuit)])
    if ablation is None:
      ablation = make_ablation(cfg, params, dataset, intervention, batch_size)
    kw = dict(intervention=intervention, batch_size=batch_size, ablation=ablation)
    if saved.level == "position":
      curve = PC.faithfulness_curve(cfg, params, dataset, saved.scores, n_edges=sizes,
                                    absolute=absolute, **kw)
      masks = cpos.circuit_masks(saved.scores.shape, n_pos, circuit)
      m_circuit = PC.evaluate_position_circuits(cfg, params, dataset, [masks], quiet=True, **kw)
      mib = PC.mib_scores(cfg, params, dataset, saved.scores, **kw)
    else:
      spans = dataset_spans(saved, dataset, prepend_bos)
      curve = PC.span_faithfulness_curve(cfg, params, dataset, saved.scores, spans,
                                         n_edges=sizes, absolute=absolute, **kw)
      masks = SC.circuit_masks(saved.scores.shape, len(saved.scores.names), circuit)
      m_circuit = PC.evaluate_span_circuits(cfg, params, dataset, [masks], spans, quiet=True,
                                            **kw)
      mib = span_mib_scores(cfg, params, dataset, saved.scores, spans, quiet=True, **kw)
    faith = float(V.normalize(float(m_circuit[0]), curve.m_full, curve.m_empty))
  except (AttributionError, G.GraphError) as e:
    raise inputs.InputError(f"--graph ({saved.level} level): {e}") from None
  ranking = "|score|" if absolute else "signed importance"
  summary = {
      "level": saved.level, "model": model.path, "task": dataset.task.name,
      "data": dataset.source, "n_examples": len(dataset), "intervention": intervention,
      "selection": "in_graph" if top_n is None else f"top_n={top_n} ({ranking}, no pruning)",
      "scores": saved.scores_file, "n_pos": n_pos, "n_edges_total": saved.n_edges_total,
      "n_edges": len(circuit), "metric_circuit": float(m_circuit[0]), "metric_full": curve.m_full,
      "metric_empty": curve.m_empty, "faithfulness": faith, "CPR": mib["CPR"], "CMD": mib["CMD"],
      "curve_sizes": curve_sizes, "absolute": absolute, "curve": curve.rows(),
  }
  if saved.level == "span":
    summary.update(schema=saved.scores.schema, span_aggregation=saved.scores.aggregation,
                   spans=list(saved.scores.names))
  if compare is not None:
    try:
      other = compare.edges if top_n is None else compare.select(top_n, absolute)
    except G.GraphError as e:
      raise inputs.InputError(f"--top_n (--compare): {e}") from None
    a, b = ({tuple(r[:4]) for r in rows} for rows in (circuit, other))
    if saved.level == "span" and compare.scores.names != saved.scores.names:
      raise inputs.InputError(f"--compare: spans {compare.scores.names}, --graph's "
                              f"{saved.scores.names}")
    summary["compare"] = {"n_edges": len(other),
                          "edge_iou": len(a & b) / len(a | b) if a | b else 1.0}
  return summary, curve, circuit


def write_outputs(out: str, saved: SavedCircuit, graph_path: str, summary: dict,
                  curve: V.FaithfulnessCurve, circuit: list[Row], dataset: tasks.Dataset, *,
                  title: str) -> None:
  """Write `OUTPUTS[saved.level]` under `out` (inside the run directory's `writing`): the curve
  (faithfulness.csv, .png), for a position circuit circuit.png (its first `MAX_DRAWN` edges) and
  circuit.html (`viz.position_viewer`), columns labelled with row 0's token ids, for a span
  circuit circuit.png (`viz.span_plot`, its first `span_plot.MAX_DRAWN_SPAN_EDGES` edges; under
  each span row 0's token ids in it, the spans from `summary`'s settings' prepend_bos), and
  evaluation.json (`summary`) last."""
  unit = f"{saved.level} edges"
  ranking = "|score|" if summary["absolute"] else "signed importance"
  plots.plot_faithfulness(curve, os.path.join(out, "faithfulness.png"), title=title,
                          label=f"circuit (top-n {unit})",
                          xlabel=f"circuit size n: top-n {unit} by {ranking} (no pruning)")
  files.atomic_write_csv(os.path.join(out, "faithfulness.csv"), curve.rows())
  if saved.level == "position":
    scores = saved.scores
    row = [str(int(t)) for t in np.asarray(next(dataset.batches(1)).clean)[0, :scores.n_pos]]
    position_plot.plot_position_circuit(
        scores, circuit[:MAX_DRAWN], os.path.join(out, "circuit.png"),
        tokens=row + [""] * (scores.n_pos - len(row)), title=f"{title} (columns: row 0's tokens)")
    with open(graph_path) as f:
      shown = json.load(f)
    shown["edges"] = dict(zip(saved.names(circuit), (float(r[4]) for r in circuit), strict=True))
    shown["meta"] = dict(shown.get("meta") or {}, faithfulness=summary["faithfulness"])
    position_viewer.write_html(shown, os.path.join(out, "circuit.html"), tokens=row, title=title)
  elif saved.level == "span":
    bos = (summary.get("settings") or {}).get("prepend_bos", True)
    spans = dataset_spans(saved, dataset, bos)  # [row, span, 2]
    n_pos = int(np.shape(dataset.clean)[1])
    row = [str(int(t)) for t in np.asarray(next(dataset.batches(1)).clean)[0, :n_pos]]
    span_plot.plot_span_circuit(saved.scores, circuit, os.path.join(out, "circuit.png"),
                                tokens=span_plot.span_tokens(spans[0], row),
                                title=f"{title} (under each span: row 0's token ids)")
  files.atomic_write_json(os.path.join(out, "evaluation.json"), summary)


def print_summary(summary: dict, name: str, compare: str | None, out: str) -> None:
  """The report's lines on the console."""
  unit = f"{summary['level']} edges"
  print(f"circuit {name} ({summary['selection']}): {summary['n_edges']} of "
        f"{summary['n_edges_total']} {unit} over {summary['n_pos']} positions")
  print(f"metric: circuit {summary['metric_circuit']:.4f}, full {summary['metric_full']:.4f}, "
        f"empty {summary['metric_empty']:.4f}")
  print(f"faithfulness {summary['faithfulness']:.4f}   CPR {summary['CPR']:.4f}   "
        f"CMD {summary['CMD']:.4f} (over {unit})")
  if compare:
    c = summary["compare"]
    print(f"overlap with {compare} ({c['n_edges']} {unit}): edge IoU {c['edge_iou']:.3f}")
  print(f"wrote {os.path.join(out, 'evaluation.json')}")
