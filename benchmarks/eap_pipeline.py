"""The `eap` package's circuit-finding pipeline as one fresh process, for the `pipeline` suite.

    python -m benchmarks.eap_pipeline --checkpoint=DIR --data=ioi.csv --n=32 --out=DIR [--steps=5]

What `find_circuit` does, done with the `eap` package (github.com/hannamw/EAP-IG, EAP-IG 2.0, on
TransformerLens), as its README and notebooks do it: the HF GPT-2 checkpoint turned into a
`HookedTransformer` (`tl_baseline.hooked_from_hf`; TL's hub loader is not used: nothing is
downloaded), the tokenizer from `--checkpoint/tokenizer.json`, `Graph.from_model`,
`attribute(..., method="EAP-IG-inputs", ig_steps=m)` with the logit difference (the notebooks'
metric, as a loss), the clean and corrupted baselines (`evaluate_baseline`), then the top-n circuit
at each of MIB's ten edge percentages (`apply_topn`, pruned) evaluated with `evaluate_graph`, and
the scores written with `Graph.to_json`. Prints one `RESULT {json}` line with the phase times
(import, load, attribute, curve, write) and the time since the process started.

The package allocates its score matrices with `device='cuda'` (eap/attribute.py, eap/utils.py); on
a machine without CUDA this process sends those allocations to the CPU (`torch.zeros` wrapped for
this process only) so that it runs at all. `pip install` the package from its repository; this
project does not depend on it (`benchmarks.run --suite=pipeline` reports it as not installed).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint", None, "HF GPT-2 directory holding tokenizer.json and "
                            "tokenizer_config.json too")
_DATA = flags.DEFINE_string("data", None, "IOI CSV in EAP-IG's format (clean, corrupted, "
                            "correct_idx, incorrect_idx)")
_N = flags.DEFINE_integer("n", 32, "number of examples (the CSV's first rows)")
_STEPS = flags.DEFINE_integer("steps", 5, "integrated-gradient steps m")
_BATCH = flags.DEFINE_integer("batch_size", 16, "examples per batch")
_OUT = flags.DEFINE_string("out", None, "directory for graph.json")

# jaxinterp.circuits.MIB_PERCENTAGES, written out: this process times only the eap package, so it
# imports neither jax nor jaxinterp (nor `benchmarks.common`, which imports both). Its imports
# (torch, transformers, eap) are inside `run`, timed as its "import" phase.
MIB_PERCENTAGES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


def cpu_for_cuda_allocations(torch) -> None:
  """torch.zeros(..., device='cuda') allocates on the CPU when there is no CUDA (this process)."""
  if torch.cuda.is_available():
    return
  zeros = torch.zeros

  def cpu_zeros(*args, device=None, **kw):
    return zeros(*args, device="cpu" if str(device).startswith("cuda") else device, **kw)

  torch.zeros = cpu_zeros


def _version(dist: str) -> str:
  """The installed version of a distribution, or "?" (e.g. source on PYTHONPATH)."""
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "?"


def _rows(path: str, n: int) -> list[tuple[str, str, list[int]]]:
  import csv
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))[:n]
  return [(r["clean"], r["corrupted"], [int(r["correct_idx"]), int(r["incorrect_idx"])])
          for r in rows]


def run(ckpt: str, data: str, n: int, steps: int, batch_size: int, out: str) -> dict:
  """The pipeline; returns the RESULT dict (phases in seconds)."""
  phases = {}
  t = time.perf_counter()

  def phase(name: str) -> None:
    nonlocal t
    now = time.perf_counter()
    phases[name] = now - t
    t = now

  import torch
  import transformers
  from eap.attribute import attribute
  from eap.evaluate import evaluate_baseline, evaluate_graph
  from eap.graph import Graph

  from benchmarks.tl_baseline import hooked_from_hf
  cpu_for_cuda_allocations(torch)
  phase("import")
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(ckpt).eval()
  model = hooked_from_hf(hf_model)
  model.requires_grad_(True)  # as from_pretrained gives it: the package's backward needs it
  del hf_model
  model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(ckpt),
                      default_padding_side="right")
  rows = _rows(data, n)
  loader = torch.utils.data.DataLoader(
      rows, batch_size=batch_size, shuffle=False,
      collate_fn=lambda b: ([x[0] for x in b], [x[1] for x in b], torch.tensor([x[2] for x in b])))
  phase("load")

  def logit_diff(logits, clean_logits, input_lengths, labels, mean=True, loss=False):
    last = logits[torch.arange(logits.size(0)), input_lengths - 1]
    good_bad = torch.gather(last, -1, labels.to(last.device))
    diff = good_bad[:, 0] - good_bad[:, 1]
    diff = -diff if loss else diff
    return diff.mean() if mean else diff

  graph = Graph.from_model(model)
  attribute(model, graph, loader, lambda *a: logit_diff(*a, loss=True), method="EAP-IG-inputs",
            ig_steps=steps, quiet=True)
  phase("attribute")

  def per_example(*a):
    return logit_diff(*a, mean=False)

  m_full = evaluate_baseline(model, loader, per_example, quiet=True).mean().item()
  m_empty = evaluate_baseline(model, loader, per_example, run_corrupted=True,
                              quiet=True).mean().item()
  n_edges = int(graph.real_edge_mask.sum())
  curve = []
  for p in MIB_PERCENTAGES:
    graph.apply_topn(int(p / 100 * n_edges), absolute=True)
    m = evaluate_graph(model, graph, loader, per_example, quiet=True).mean().item()
    faith = (m - m_empty) / (m_full - m_empty) if m_full != m_empty else None
    curve.append(dict(percentage=p, n_edges_kept=graph.count_included_edges(), metric=m,
                      faithfulness=faith))
  phase("curve")
  os.makedirs(out, exist_ok=True)
  graph.to_json(os.path.join(out, "graph.json"))
  phase("write")
  return dict(phases=phases, n_examples=len(rows), n_edges=n_edges, curve=curve, m_full=m_full,
              m_empty=m_empty, torch_threads=torch.get_num_threads(),
              eap_version=_version("eap"))


def main(argv):
  del argv
  if not (_CKPT.value and _DATA.value and _OUT.value):
    sys.exit("--checkpoint, --data and --out are required")
  out = run(_CKPT.value, _DATA.value, _N.value, _STEPS.value, _BATCH.value, _OUT.value)
  out["python_start_to_end_s"] = time.perf_counter() - T_START
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  app.run(main)
