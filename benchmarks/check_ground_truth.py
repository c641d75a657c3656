"""Rerun the ground-truth tables of docs/ground_truth.md and fail on drift.

    python -m benchmarks.check_ground_truth                      # every case and method (~25 min
                                                                  # on a loaded 2-core CPU)
    python -m benchmarks.check_ground_truth --cases=hist,frac_prevs --methods=EAP,exact

Reads the four AUROC tables ("Edge/Node AUROC under patching/zero-all": method x case, cells
"0.714 (6 s)" or "n/a (3 s)") and the "visible under ..." columns of the cases table from the
document, reruns the chosen cases and methods as `benchmarks/ground_truth.py` produced them
(`recovery.library_case(name, 16)` / `recovery.toy_case(64)`, seed 0, every method with its
defaults under patching and zero-all, and "EAP-IG-inputs (m=50)": EAP-IG-inputs with 50 steps), and
compares. A documented AUROC drifts when |measured - documented| > `--tolerance` (default 0.001:
the tables round to 3 decimals, so an exact reproduction is within 0.0005; the runs are
deterministic on one machine), or when one is "n/a" and the other is not; a visible-edge count
drifts when it differs at all. Times are not checked. Prints every compared cell, then one line:
"ok: N cells" (exit 0) or "drift in K of N cells: ..." (exit 1). `--json_out` writes the measured
figures (`recovery.summary` per case, as results_cpu_ground_truth.json holds them).

Not run by CI: the full check takes about as long as the whole CI run. The tests of
tests/groundtruth/test_truth.py check the document's parser and a reduced table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

from absl import app, flags

from jaxinterp.groundtruth import recovery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "ground_truth.md")
MORE = re.compile(r"^(?P<method>.+) \(m=(?P<steps>\d+)\)$")
_HEADING = re.compile(r"^### (Edge|Node) AUROC under (\S+)\s*$")
_CELL = re.compile(r"^(?P<value>n/a|\d+\.\d+)( \(.*\))?$")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when it runs, so that importing the module from tests defines
  no absl flag that another binary's could clash with)."""
  flags.DEFINE_string("doc", DOC, "the document whose tables to check")
  flags.DEFINE_string("cases", None, "comma-separated cases (default: every column)")
  flags.DEFINE_string("methods", None, "comma-separated table rows (default: every row), e.g. "
                      "EAP,edge-pruning,'EAP-IG-inputs (m=50)'")
  flags.DEFINE_float("tolerance", 0.001, "largest |measured - documented| AUROC accepted")
  flags.DEFINE_string("json_out", None, "write the measured figures here")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One documented figure: `level` ("edge", "node" or "visible") under `intervention`."""

  case: str
  method: str  # a table row ("" for the visible-edge counts)
  intervention: str
  level: str
  value: float | None  # None: "n/a"


def _rows(lines: list[str], start: int) -> list[list[str]]:
  """The Markdown table starting at or after line `start`: its rows as stripped cells (header
  first, the |---| line dropped)."""
  i = start
  while i < len(lines) and not lines[i].startswith("|"):
    i += 1
  out = []
  while i < len(lines) and lines[i].startswith("|"):
    cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
    if not all(set(c) <= set("-: ") for c in cells):
      out.append(cells)
    i += 1
  return out


def parse(text: str) -> list[Cell]:
  """Every figure of the document's AUROC tables and its cases table's visible-edge columns."""
  lines = text.splitlines()
  cells = []
  for i, line in enumerate(lines):
    m = _HEADING.match(line)
    if m:
      level, iv = m.group(1).lower(), m.group(2)
      head, *body = _rows(lines, i + 1)
      for row in body:
        for case, text_ in zip(head[1:], row[1:], strict=True):
          c = _CELL.match(text_)
          if c is None:
            raise ValueError(f"{level} AUROC under {iv}, {row[0]} on {case}: cannot read {text_!r}")
          value = None if c.group("value") == "n/a" else float(c.group("value"))
          cells.append(Cell(case, row[0], iv, level, value))
    elif line.startswith("| case | layers |"):
      head, *body = _rows(lines, i)
      for col, name in enumerate(head):
        v = re.match(r"visible under (\S+)$", name)
        if v:
          cells += [Cell(row[0], "", v.group(1), "visible", float(row[col])) for row in body]
  if not cells:
    raise ValueError("no AUROC tables found")
  return cells


def _measure(case_name: str, rows: list[str]) -> dict:
  """`recovery.summary` of the case with the table rows `rows` run as the benchmark ran them."""
  case = (recovery.toy_case(64) if case_name == "toy" else recovery.library_case(case_name, 16))
  plain = [r for r in rows if not MORE.match(r)]
  results = recovery.benchmark(case, plain, ("patching", "zero-all")) if plain else []
  for r in rows:
    m = MORE.match(r)
    if m:
      more = recovery.benchmark(case, [m.group("method")], ("patching",),
                                ig_steps=int(m.group("steps")))
      for x in more:
        x.method = r
      results += more
  return recovery.summary(case, results)


def compare(cells: list[Cell], measured: dict[str, dict], tolerance: float
            ) -> list[tuple[Cell, float | None, bool]]:
  """(cell, measured value, drifted) for every documented cell of a measured case and row."""
  out = []
  for c in cells:
    entry = measured.get(c.case)
    if entry is None:
      continue
    found = [r for r in entry["results"] if r["intervention"] == c.intervention
             and (r["method"] == c.method or c.level == "visible")]
    if not found:
      continue
    got = (float(found[0]["n_visible_edges"]) if c.level == "visible"
           else found[0][f"{c.level}_auroc"])
    if c.value is None or got is None:
      bad = (c.value is None) != (got is None)
    else:
      bad = abs(got - c.value) > (tolerance if c.level != "visible" else 0)
    out.append((c, got, bad))
  return out


def _names(text: str | None, known: list[str], what: str) -> list[str]:
  if text is None:
    return known
  names = [x.strip() for x in text.split(",") if x.strip()]
  bad = [x for x in names if x not in known]
  if bad or not names:
    raise app.UsageError(f"--{what}={text}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; "
                         f"the document has {', '.join(known)}")
  return names


def check(doc: str, cases: list[str] | None = None, methods: list[str] | None = None,
          tolerance: float = 0.001) -> tuple[list[tuple[Cell, float | None, bool]], dict]:
  """Rerun `cases` x `methods` (default: all the document has) and compare with `doc`: the
  comparisons and the measured figures."""
  with open(doc, encoding="utf-8") as f:
    cells = parse(f.read())
  all_cases = list(dict.fromkeys(c.case for c in cells if c.level != "visible"))
  all_methods = list(dict.fromkeys(c.method for c in cells if c.level != "visible"))
  cases = cases or all_cases
  methods = methods or all_methods
  cells = [c for c in cells if c.case in cases and (c.level == "visible" or c.method in methods)]
  measured = {}
  for name in cases:
    measured[name] = _measure(name, methods)
    print(f"{name}: measured", flush=True)
  return compare(cells, measured, tolerance), measured


def _fmt(x: float | None, level: str) -> str:
  return f"{x:.0f}" if level == "visible" and x is not None else recovery.fmt_auroc(x)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  doc, tol = FLAGS.doc, FLAGS.tolerance
  with open(doc, encoding="utf-8") as f:
    cells = parse(f.read())
  cases = _names(FLAGS.cases, list(dict.fromkeys(c.case for c in cells if c.method)), "cases")
  methods = _names(FLAGS.methods, list(dict.fromkeys(c.method for c in cells if c.method)),
                   "methods")
  results, measured = check(doc, cases, methods, tol)
  for c, got, bad in results:
    what = f"{c.level} AUROC" if c.level != "visible" else "visible edges"
    print(f"{'DRIFT' if bad else 'ok   '} {c.case:13s} {c.method or '-':24s} {c.intervention:9s} "
          f"{what:14s} documented {_fmt(c.value, c.level):>6s} measured {_fmt(got, c.level):>6s}")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w", encoding="utf-8") as f:
      json.dump({"settings": {"n_examples": 16, "toy_prompts": 64, "seed": 0},
                 "programs": measured}, f, indent=1)
  drift = [f"{c.case} {c.method or 'visible'} {c.intervention} {c.level}"
           for c, _, bad in results if bad]
  if drift:
    print(f"drift in {len(drift)} of {len(results)} cells (tolerance {tol}): {'; '.join(drift)}")
    sys.exit(1)
  print(f"ok: {len(results)} cells within {tol} of {os.path.relpath(doc)}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
