"""Runs the `eap` package (EAP-IG 2.0, github.com/hannamw/EAP-IG) for `test_eap_package.py`.

    python tests/attribution/eap_package_driver.py SPEC.json

SPEC names an HF GPT-2, Llama or GPT-NeoX directory (with its tokenizer), an EAP-IG task CSV and
its task (`ioi`, or `greater-than` with the greater-than notebook's metric), the number of rows,
the batch size, IG steps, the (method, intervention) pairs to attribute, and circuit files written
by jaxinterp.
This process imports the `eap` package (its source on PYTHONPATH), TransformerLens and torch, not
jax or jaxinterp, and writes `eap.npz` beside SPEC:

- `scores/{method}/{intervention}`: `attribute(...)`'s `graph.scores` [n_forward, n_backward] with
  the per-batch *sum* of the task's metric (the logit difference, or greater-than's probability
  difference) as the metric, so that the package's scores (divided by the number of rows) are
  m(edge ablated) - m(clean) averaged over rows, jaxinterp's units and sign;
- `nodes/{method}/{intervention}/{level}`: `attribute_node(...)`'s node scores [n_forward], or
  with `neuron=True` its neuron scores [n_forward, d_model], with the same metrics (IOI);
- `real_edge_mask`: the package's valid edges;
- with `mended` in SPEC, `mended/EAP-IG-activations/...` and `mended/exact/...`: those methods
  with two bugs of the package mended (`embeddings_as_leaf`, `exact_per_edge`);
- `clean`, `corrupted`: `evaluate_baseline` of the clean and the corrupted run, per row;
- `circuit/{name}/{intervention}`: `evaluate_graph` of each circuit file (read with
  `Graph.from_json`) under patching and zero ablation, per row, and `read/{name}` the scores the
  package read from it;
- and, given `notebook_batch_size`, `notebook.json`: EAP-IG-inputs' graph with the notebooks'
  metric (`loss=True, mean=True`) over batches of that size, written by `Graph.to_json`, for
  jaxinterp to read.

The package allocates with `device='cuda'`; without CUDA those allocations go to the CPU (this
process only).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys

import numpy as np
import torch
from eap.attribute import attribute
from eap.attribute_node import attribute_node
from eap.evaluate import evaluate_baseline, evaluate_graph
from eap.graph import Graph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.attribution.reference_checkpoint import hooked_on_cpu  # noqa: E402


def logit_diff(logits, clean_logits, input_lengths, labels, mean=False, loss=False, total=False):
  """The IOI notebook's metric: correct minus incorrect logit at the last real token."""
  del clean_logits
  last = logits[torch.arange(logits.size(0)), input_lengths - 1]
  good_bad = torch.gather(last, -1, labels.to(last.device))
  diff = good_bad[:, 0] - good_bad[:, 1]
  diff = -diff if loss else diff
  return diff.mean() if mean else diff.sum() if total else diff


def prob_diff(year_ids):
  """The greater-than notebook's metric (its `get_prob_diff`): at the last real token, the
  probability of the years after the start year YY minus that of the years up to YY, over the
  100 two-digit year tokens `year_ids`."""
  def metric(logits, clean_logits, input_lengths, labels, mean=False, loss=False, total=False):
    del clean_logits
    last = logits[torch.arange(logits.size(0)), input_lengths - 1]
    probs = torch.softmax(last, dim=-1)[:, year_ids]
    diff = torch.stack([p[y + 1:].sum() - p[:y + 1].sum()
                        for p, y in zip(probs, labels, strict=True)])
    diff = -diff if loss else diff
    return diff.mean() if mean else diff.sum() if total else diff
  return metric


@contextlib.contextmanager
def embeddings_as_leaf(model):
  """The package's EAP-IG-activations with one bug mended. Its input-node pass replaces
  `hook_embed`'s output by the interpolated embeddings, a tensor that needs no gradient; without
  a learned position embedding added after it (rotary models), nothing before layer 0 then needs
  one, the backward hooks at layer 0's inputs never fire, and the edges from the input node into
  them lose that pass. Here the interpolated embeddings become a leaf that needs a gradient
  (values unchanged), so every hook fires."""
  def leaf(x, hook):
    return x if x.requires_grad else x.detach().requires_grad_(True)

  hooks = model.hooks

  @contextlib.contextmanager
  def with_leaf(fwd_hooks=(), bwd_hooks=(), **kwargs):
    with hooks(fwd_hooks=[*fwd_hooks, ("hook_embed", leaf)], bwd_hooks=bwd_hooks, **kwargs) as m:
      yield m

  model.hooks = with_leaf
  try:
    yield
  finally:
    del model.hooks


def exact_per_edge(model, loader, metric, intervention):
  """Exact scores through the package's `evaluate_graph`, each edge ablated alone in a fresh graph.
  The package's own loop (`get_scores_exact`) reuses one graph, which `evaluate_graph` prunes in
  place: once an edge whose removal leaves a node without outgoing edges (in a parallel block,
  a last-layer head's edge to the logits) has been scored, that node's incoming edges stay
  removed for every later edge."""
  scores = Graph.from_model(model)
  baseline = evaluate_baseline(model, loader, metric, quiet=True).mean().item()
  for name, edge in scores.edges.items():
    graph = Graph.from_model(model)
    graph.in_graph |= graph.real_edge_mask
    graph.edges[name].in_graph = False
    edge.score = evaluate_graph(model, graph, loader, metric, quiet=True,
                                intervention=intervention).mean().item() - baseline
  return scores.scores.detach().numpy()


def setup(spec: dict):
  """(the HookedTransformer of `spec["checkpoint"]` with its tokenizer, the CSV's first
  `spec["n"]` rows, a DataLoader of them in batches of `spec["batch_size"]`, the task's per-row
  metric), on the CPU."""
  model = hooked_on_cpu(spec["checkpoint"])
  task = spec.get("task", "ioi")
  with open(spec["csv"], newline="") as f:
    rows = [(r["clean"], r["corrupted"], int(r["correct_idx"]) if task == "greater-than" else
             [int(r["correct_idx"]), int(r["incorrect_idx"])])
            for r in list(csv.DictReader(f))[:spec["n"]]]
  if task == "greater-than":
    # The notebook's year tokens are `tokenizer(f"{year:02d}").input_ids[0]`; TransformerLens's
    # tokenizer prepends BOS here (transformers 5, a saved GPT-2 tokenizer config), which would
    # make every "year" the BOS token. The notebook means the years' own tokens:
    metric = prob_diff(torch.tensor([
        model.tokenizer(f"{y:02d}", add_special_tokens=False).input_ids[0] for y in range(100)]))
  else:
    metric = logit_diff
  loader = torch.utils.data.DataLoader(
      rows, batch_size=spec["batch_size"], shuffle=False,
      collate_fn=lambda b: ([x[0] for x in b], [x[1] for x in b], torch.tensor([x[2] for x in b])))
  return model, rows, loader, metric


def main(spec_path: str) -> None:
  spec = json.load(open(spec_path))
  out = os.path.dirname(os.path.abspath(spec_path))
  model, rows, loader, task_metric = setup(spec)
  arrays = {}
  for method, intervention in spec["pairs"]:
    graph = Graph.from_model(model)
    # a per-row metric for exact (evaluate_graph), a summed one for the gradient methods
    metric = task_metric if method == "exact" else (lambda *a: task_metric(*a, total=True))
    kwargs = {} if method == "information-flow-routes" else {"intervention": intervention}
    attribute(model, graph, loader, metric, method=method, ig_steps=spec["steps"], quiet=True,
              **kwargs)
    arrays[f"scores/{method}/{intervention}"] = graph.scores.detach().numpy()
    arrays["real_edge_mask"] = graph.real_edge_mask.numpy()
    if spec.get("mended") and method == "EAP-IG-activations":
      graph = Graph.from_model(model)
      with embeddings_as_leaf(model):
        attribute(model, graph, loader, metric, method=method, ig_steps=spec["steps"],
                  quiet=True, **kwargs)
      arrays[f"mended/{method}/{intervention}"] = graph.scores.detach().numpy()
    if spec.get("mended") and method == "exact":
      arrays[f"mended/{method}/{intervention}"] = exact_per_edge(model, loader, metric,
                                                                 intervention)
  for method, intervention, level in spec.get("node_pairs", []):
    neuron = level == "neuron"
    graph = Graph.from_model(model, neuron_level=neuron, node_scores=True)
    metric = task_metric if method == "exact" else (lambda *a: task_metric(*a, total=True))
    attribute_node(model, graph, loader, metric, method=method, intervention=intervention,
                   ig_steps=spec["steps"], quiet=True, neuron=neuron)
    scores = graph.neurons_scores if neuron else graph.nodes_scores
    arrays[f"nodes/{method}/{intervention}/{level}"] = scores.detach().numpy()
  arrays["clean"] = evaluate_baseline(model, loader, task_metric, quiet=True).numpy()
  arrays["corrupted"] = evaluate_baseline(model, loader, task_metric, run_corrupted=True,
                                          quiet=True).numpy()
  for name, path in spec.get("circuits", {}).items():
    g = Graph.from_json(path)
    arrays[f"read/{name}"] = g.scores.detach().numpy()
    for intervention in ("patching", "zero"):
      arrays[f"circuit/{name}/{intervention}"] = evaluate_graph(
          model, g, loader, task_metric, quiet=True, intervention=intervention).numpy()
  if "notebook_batch_size" in spec:
    loader = torch.utils.data.DataLoader(rows, batch_size=spec["notebook_batch_size"],
                                         shuffle=False, collate_fn=loader.collate_fn)
    graph = Graph.from_model(model)
    attribute(model, graph, loader, lambda *a: task_metric(*a, mean=True, loss=True),
              method="EAP-IG-inputs", ig_steps=spec["steps"], quiet=True)
    graph.to_json(os.path.join(out, "notebook.json"))
  np.savez(os.path.join(out, "eap.npz"), **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
