"""Compare circuits: how far two or more graph.json files agree, pair by pair.

    python -m experiments.compare_circuits runs/eap/graph.json runs/ig/graph.json \\
        runs/acdc/graph.json --k=10,50,200 --out=runs/compare

For every pair of graphs (of one model shape; any method, ours or the PyTorch EAP-IG's), ranked by
|score| over the model's valid edges: Spearman's rank correlation of |score|, and at each size k of
`--k` the top-k overlap (the fraction of A's k strongest edges among B's k strongest) and the edge
and node IoU of the two top-k circuits after pruning (`circuits.mib`'s IoU). Prints a table per
pair and writes `comparison.csv` (one row per pair and size) and `comparison.png` (the three
measures against k, a line per pair) under `--out`, then `DONE`; an --out holding other outputs is
refused unless --overwrite. The library is `jaxinterp.circuits.compare`.
"""

from __future__ import annotations

import os

from absl import app

from jaxinterp.circuits import Graph, GraphError, compare
from jaxinterp.experiments import cli, common
from jaxinterp.runtime import files, inputs

OUT = "runs/compare_circuits"
OUTPUTS = ("comparison.csv", "comparison.png")
KS = ",".join(map(str, compare.DEFAULT_KS))
cli.define("string", "k", KS,
           "Comma-separated circuit sizes (edges requested); sizes above the number of valid "
           "edges are replaced by that number.")
cli.define("string", "labels", None, "Comma-separated names of the graphs in the outputs "
           "(default: each graph's method, else its directory's name).")
cli.define("string", "out", OUT, "Output directory.")
cli.define("bool", "overwrite", False, common.OVERWRITE_HELP)


def _sizes(text: str) -> list[int]:
  try:
    ks = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    ks = []
  if not ks or min(ks) < 1:
    raise inputs.InputError(f"--k={text}: expected positive edge counts, e.g. 10,50,100")
  return ks


def _load(paths: list[str]) -> list[Graph]:
  graphs = []
  for p in paths:
    if not os.path.isfile(p):
      raise inputs.InputError(f"{p}: no such file")
    try:
      graphs.append(Graph.from_json(p))
    except GraphError as e:  # it names the file
      raise inputs.InputError(str(e)) from None
  return graphs


def main(argv):
  paths = list(argv[1:])
  if len(paths) < 2:
    raise app.UsageError("give at least two graph.json files to compare")
  ks = _sizes(cli.value("k", KS))
  graphs = _load(paths)
  given = cli.value("labels", None)
  labels = [x.strip() for x in given.split(",")] if given else \
      compare.labels_for(paths, [g.meta for g in graphs])
  if len(labels) != len(paths) or len(set(labels)) != len(labels):
    raise inputs.InputError(f"--labels={given}: give {len(paths)} distinct names, one per graph")
  try:
    results = compare.compare_all(graphs, labels, ks)
  except GraphError as e:
    raise inputs.InputError(str(e)) from None
  out = cli.value("out", OUT)
  record = files.RunRecord("compare_circuits", {
      "graphs": [os.path.abspath(p) for p in paths], "labels": labels, "k": ks,
      "sha256": [inputs.file_digest(p) for p in paths]}, ("labels",))
  for label, path in zip(labels, paths, strict=True):
    print(f"{label} = {path}")
  for c in results:
    print(compare.table(c))
  with inputs.run_dir(out, record=record, overwrite=cli.value("overwrite", False)) as held:
    if held.complete:
      inputs.already_complete(out, record)
      return
    with held.writing(OUTPUTS):
      compare.write_csv(results, os.path.join(out, "comparison.csv"))
      compare.plot(results, os.path.join(out, "comparison.png"),
                   title=f"Circuit agreement by size ({', '.join(labels)}), ranked by |score|")
  print(f"wrote {out}/{', '.join(OUTPUTS)}")


if __name__ == "__main__":
  cli.run(main)
