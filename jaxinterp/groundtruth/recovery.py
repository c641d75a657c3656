"""Known-circuit recovery: how well each attribution method finds a circuit that is known exactly.

A `Case` is a model, its true circuit, clean/corrupted data with a metric, and which true edges each
ablation can see (`jaxinterp.groundtruth.truth` defines all three). Cases:

- `tracr_case`: a tracr-compiled RASP program (ported with `models.from_tracr`), its weight-derived
  circuit, `tracr_tasks.make_dataset` data; `library_case` for tracr's library programs;
- `toy_case`: the bundled toy induction model, its documented circuit, `toy.induction_task_dataset`.

`benchmark` runs every method under every ablation it supports and scores it with
`ground_truth.evaluate` (edge and node AUROC, the time taken); `write_case` writes `truth.json`,
`{method}/graph.json` (and `graph.{intervention}.json` for ablations other than patching) and
returns the case's entry for `auroc.json`; `table` formats results as a Markdown table.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxinterp import attribution
from jaxinterp.circuits import Graph
from jaxinterp.groundtruth import toy, tracr_tasks
from jaxinterp.groundtruth import truth as ground_truth
from jaxinterp.models import tracr as T
from jaxinterp.models.config import ModelConfig
from jaxinterp.tasks import Dataset


@dataclasses.dataclass
class Case:
  """A model with a known circuit and data to find it on.

  Attributes:
    name: e.g. `reverse`, `toy`, or the `--program` spec.
    cfg, params: the model.
    truth: the true circuit (`in_graph`).
    dataset: clean/corrupted pairs and the metric.
    visible: {intervention: Bool[ndarray, "sender receiver"]} for ablations whose visibility is
      given (the toy's is documented); others are computed with `ground_truth.visible_edges`.
    info: facts for `auroc.json` (source, vocabulary, how often the compiled model agrees with
      the RASP program, ...).
  """

  name: str
  cfg: ModelConfig
  params: Any
  truth: Graph
  dataset: Dataset
  visible: dict = dataclasses.field(default_factory=dict)
  info: dict = dataclasses.field(default_factory=dict)


def tracr_case(name: str, assembled, program=None, n_examples: int = 16, seed: int = 0,
               position: int | None = None, info: dict | None = None) -> Case:
  """The case of a compiled tracr model (`program`, the RASP SOp, to check the model against it)."""
  model = T.from_tracr(assembled)
  truth = ground_truth.tracr_circuit(model)
  data = tracr_tasks.make_dataset(model, n_examples, seed, position)
  info = dict(info or {})
  info.update(source="tracr", n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads,
              d_model=model.cfg.d_model, causal=model.cfg.causal, n_examples=n_examples,
              rows=len(data), position="all" if position is None else position,
              output="categorical" if model.encoding.categorical else "numerical")
  if program is not None:
    info["rasp_agreement"] = tracr_tasks.rasp_agreement(program, model, data)
    tracr_tasks.warn_disagreement(name, info["rasp_agreement"])
  return Case(name, model.cfg, model.params, truth, data, {}, info)


def library_case(name: str, n_examples: int = 16, seed: int = 0,
                 position: int | None = None) -> Case:
  """`tracr_case` for a program of `tracr_tasks.LIBRARY`."""
  spec = tracr_tasks.LIBRARY.get(name)
  if spec is None:
    raise tracr_tasks.ProgramError(f"unknown library program {name!r}; known: "
                                   f"{', '.join(tracr_tasks.LIBRARY)}")
  program = tracr_tasks.build_program(lambda: spec.make(spec.max_seq_len), name)
  assembled = tracr_tasks.compile_program(program, spec.vocab, spec.max_seq_len)
  return tracr_case(name, assembled, program, n_examples, seed, position,
                    {"vocab": list(spec.vocab), "max_seq_len": spec.max_seq_len,
                     "description": spec.description})


def toy_case(n_examples: int = 64, seed: int = 0) -> Case:
  """The bundled toy induction model with its documented circuit. Under patching (first half of the
  prompt corrupted, the metric read at the last token) the circuit's positional and query edges are
  invisible (`toy_invisible`); other ablations' visibility is `visible_edges`'s."""
  m = toy.load_toy()
  truth = ground_truth.toy_circuit(m.cfg)
  data = toy.induction_task_dataset(n_examples, seed=seed)
  visible = {"patching": truth.in_graph & ~ground_truth.toy_invisible(truth)}
  info = {"source": "bundled toy model", "n_layers": m.cfg.n_layers, "n_heads": m.cfg.n_heads,
          "d_model": m.cfg.d_model, "n_examples": n_examples, "rows": len(data),
          "description": "2-layer induction model, documented circuit (README)"}
  return Case("toy", m.cfg, m.params, truth, data, visible, info)


# ------------------------------------------------------------------------------------- benchmark


@dataclasses.dataclass
class MethodResult:
  """One method under one ablation, scored against the truth.

  Attributes:
    method, intervention: what ran.
    graph: its edge scores, with the top `n_true_edges` edges by |score| marked in the graph.
    seconds: wall time of `attribution.attribute` (compilation included).
    scores: `evaluate`'s dict (edge_auroc, node_auroc, counts).
  """

  method: str
  intervention: str
  graph: Graph
  seconds: float
  scores: dict


def supports(method: str, intervention: str) -> bool:
  """Whether the registered `method` can run with `intervention`."""
  allowed = attribution.get_method(method).interventions
  return allowed is None or intervention in allowed


def benchmark(case: Case, methods: Sequence[str],
              interventions: Sequence[str] = ("patching", "zero-all"), ig_steps: int = 5,
              batch_size: int = 64,
              on_result: Callable[[MethodResult], None] | None = None) -> list[MethodResult]:
  """Every method under every ablation it supports, scored against the case's true circuit.

  Args:
    case: the model, its truth and data.
    methods: names in `attribution.METHODS`.
    interventions: ablations to run; a method that does not support one is skipped there. The
      true edges each can see are `case.visible[intervention]`, else `ground_truth.visible_edges`.
    ig_steps, batch_size: passed to `attribution.attribute`.
    on_result: called with each result as it is ready.
  """
  for name in methods:
    attribution.get_method(name)  # unknown names fail before any work
  out = []
  for intervention in interventions:
    if not any(supports(m, intervention) for m in methods):
      continue
    vis = case.visible.get(intervention)
    if vis is None:
      vis = ground_truth.visible_edges(case.cfg, case.params, case.truth, case.dataset,
                                       intervention, batch_size)
      case.visible[intervention] = vis
    for name in methods:
      if not supports(name, intervention):
        continue
      t0 = time.perf_counter()
      a = attribution.attribute(case.cfg, case.params, case.dataset, method=name,
                                intervention=intervention, batch_size=batch_size, quiet=True,
                                **attribution.get_method(name).options_among(
                                    {"ig_steps": ig_steps}))
      seconds = time.perf_counter() - t0
      result = ground_truth.evaluate(case.truth, a.scores, vis, a.clean_metric)
      g = Graph.from_config(case.cfg, a.scores).top_n(max(1, result["n_true_edges"]), prune=False)
      g.meta.update(method=name, intervention=intervention, seconds=round(seconds, 3),
                    ig_steps=ig_steps, rows=len(case.dataset), **result)
      r = MethodResult(name, intervention, g, seconds, result)
      out.append(r)
      if on_result is not None:
        on_result(r)
  return out


def summary(case: Case, results: Sequence[MethodResult]) -> dict:
  """The case's entry in `auroc.json`."""
  return {"info": case.info, "n_true_edges": int(case.truth.in_graph.sum()),
          "n_edges": int(case.truth.valid.sum()),
          "results": [dict(method=r.method, intervention=r.intervention,
                           seconds=round(r.seconds, 3), **r.scores) for r in results]}


def graph_file(method: str, intervention: str) -> str:
  """Where a result's graph goes in a case directory: `{method}/graph.json` under patching,
  `{method}/graph.{intervention}.json` otherwise."""
  suffix = "" if intervention == "patching" else f".{intervention}"
  return os.path.join(method, f"graph{suffix}.json")


def write_case(case: Case, results: Sequence[MethodResult], out: str,
               meta: dict | None = None) -> list[str]:
  """Write `truth.json` and each result's graph under `out`; returns the paths written
  (relative)."""
  os.makedirs(out, exist_ok=True)
  written = ["truth.json"]
  case.truth.to_json(os.path.join(out, "truth.json"), dict(meta or {}, case=case.name, **case.info))
  for r in results:
    rel = graph_file(r.method, r.intervention)
    os.makedirs(os.path.join(out, r.method), exist_ok=True)
    r.graph.to_json(os.path.join(out, rel), dict(meta or {}, case=case.name))
    written.append(rel)
  return written


def fmt_auroc(x: float | None) -> str:
  """An AUROC to 3 decimals, "n/a" where undefined."""
  return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def table(entries: dict[str, dict]) -> str:
  """A Markdown table: one row per case and method, edge/node AUROC and seconds per ablation."""
  ivs = sorted({r["intervention"] for e in entries.values() for r in e["results"]},
               key=lambda s: (s != "patching", s))
  head = "| case | method | " + " | ".join(f"edge AUROC ({iv}) | node AUROC ({iv}) | s ({iv})"
                                           for iv in ivs) + " |"
  lines = [head, "|" + "---|" * (2 + 3 * len(ivs))]
  fmt = fmt_auroc
  for name, e in entries.items():
    methods = list(dict.fromkeys(r["method"] for r in e["results"]))
    for m in methods:
      cells = []
      for iv in ivs:
        r = next((r for r in e["results"] if r["method"] == m and r["intervention"] == iv), None)
        cells += ["—"] * 3 if r is None else [fmt(r["edge_auroc"]), fmt(r["node_auroc"]),
                                              f"{r['seconds']:.1f}"]
      lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def matrix(entries: dict[str, dict], intervention: str = "patching", level: str = "edge") -> str:
  """A Markdown table, method x case: `level` AUROC under `intervention`, and the seconds taken."""
  cases = list(entries)
  methods = list(dict.fromkeys(r["method"] for e in entries.values() for r in e["results"]
                               if r["intervention"] == intervention))
  lines = ["| method | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
  for m in methods:
    cells = []
    for c in cases:
      r = next((r for r in entries[c]["results"]
                if r["method"] == m and r["intervention"] == intervention), None)
      cells.append("—" if r is None else
                   f"{fmt_auroc(r[f'{level}_auroc'])} ({r['seconds']:.0f} s)")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
