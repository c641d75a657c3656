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
import csv
import io
import json
import os
import sys

import torch
import transformers
from eap.graph import Graph
from MIB_circuit_track.evaluation import evaluate_area_under_curve

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.tl_baseline import hooked_from_hf  # noqa: E402
from tests.attribution.eap_package_driver import _cpu_for_cuda, logit_diff  # noqa: E402


def main(spec_path: str) -> None:
  spec = json.load(open(spec_path))
  _cpu_for_cuda()
  torch.set_num_threads(1)
  model = hooked_from_hf(transformers.GPT2LMHeadModel.from_pretrained(spec["checkpoint"]).eval())
  model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(spec["checkpoint"]),
                      default_padding_side="right")
  with open(spec["csv"], newline="") as f:
    rows = [(r["clean"], r["corrupted"], [int(r["correct_idx"]), int(r["incorrect_idx"])])
            for r in list(csv.DictReader(f))[:spec["n"]]]
  loader = torch.utils.data.DataLoader(
      rows, batch_size=spec["batch_size"], shuffle=False,
      collate_fn=lambda b: ([x[0] for x in b], [x[1] for x in b], torch.tensor([x[2] for x in b])))
  out = {}
  for absolute in (True, False):
    graph = Graph.from_json(spec["graph"])
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per percentage
      counts, area_under, area_from_1, average, faith = evaluate_area_under_curve(
          model, graph, loader, logit_diff, quiet=True, absolute=absolute)
    out[str(absolute)] = dict(weighted_edge_counts=counts, area_under=area_under,
                              area_from_1=area_from_1, average=average, faithfulnesses=faith)
  with open(os.path.join(os.path.dirname(os.path.abspath(spec_path)), "mib.json"), "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1])
