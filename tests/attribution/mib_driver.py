"""Runs MIB's circuit-track evaluation (github.com/hannamw/MIB-circuit-track) for
`test_eap_package.py`.

    python tests/attribution/mib_driver.py SPEC.json

SPEC names an HF GPT-2 directory (with its tokenizer), an EAP-IG task CSV, the number of rows, the
batch size and a graph.json written by jaxinterp. With MIB's repository and its EAP-IG (the
submodule's `src/`) on PYTHONPATH, this process reads the graph with the package's
`Graph.from_json` and runs `MIB_circuit_track.evaluation.evaluate_area_under_curve` on it (edge
level, patching, the logit difference per row, absolute and signed scores), and writes `mib.json`
beside SPEC: for each `absolute`, the weighted edge counts, the faithfulness at each of MIB's
percentages, and the area under the curve (CPR), the area from 1 (CMD) and the average.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from eap.graph import Graph
from MIB_circuit_track.evaluation import evaluate_area_under_curve

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.attribution.eap_package_driver import setup  # noqa: E402


def main(spec_path: str) -> None:
  spec = json.load(open(spec_path))
  model, _, loader, metric = setup(spec)
  out = {}
  for absolute in (True, False):
    graph = Graph.from_json(spec["graph"])
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per percentage
      counts, area_under, area_from_1, average, faith = evaluate_area_under_curve(
          model, graph, loader, metric, quiet=True, absolute=absolute)
    out[str(absolute)] = dict(weighted_edge_counts=counts, area_under=area_under,
                              area_from_1=area_from_1, average=average, faithfulnesses=faith)
  with open(os.path.join(os.path.dirname(os.path.abspath(spec_path)), "mib.json"), "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1])
