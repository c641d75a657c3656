"""Runs PEAP's position-aware edge attribution patching (github.com/technion-cs-nlp/PEAP,
`src/pos_aware_edge_attribution_patching.py`) for `test_peap.py`.

    python tests/attribution/peap_driver.py SPEC.json

SPEC names an HF GPT-2 or Llama directory (with its tokenizer), PEAP-format clean and counterfactual
CSVs (`prompt`, one column per span holding the span's first position, and `length`; the clean one
also `correct_id`, `incorrect_id`), the span names (the last one `length`, as PEAP requires) and the
ablation type (`counterfactual` or `zero`). With PEAP's `src/` on PYTHONPATH, this process runs
PEAP's own `position_aware_edge_attribution_patching` on every row (TransformerLens, torch, no jax)
and writes `peap.json` beside SPEC: every non-crossing edge, named as EAP-IG names it (`input`,
`a{l}.h{h}`, `m{l}`, `logits`, `<q|k|v>`), with PEAP's per-span `sum`, `avg` and `max_abs` scores
averaged over rows (one value per span, then one for the whole prompt).

PEAP loads its model with `HookedTransformer.from_pretrained` and moves tensors to CUDA; here
`from_pretrained` returns the checkpoint's model and CUDA moves stay on the CPU (this process
only). Its metric is the logit difference of the row's `correct_id` and `incorrect_id` at the last
position (PEAP's `logit_diff` looks the tokens up by their strings).
"""

from __future__ import annotations

import json
import os
import pickle
import sys

import exp as peap_exp
import pandas as pd
import pos_aware_edge_attribution_patching as peap
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.attribution.reference_checkpoint import hooked_on_cpu  # noqa: E402


def _cpu_for_cuda_moves() -> None:
  """`tensor.to("cuda")` stays on the CPU when there is no CUDA."""
  if torch.cuda.is_available():
    return
  to = torch.Tensor.to

  def cpu_to(self, *args, **kw):
    args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
    if str(kw.get("device", "")).startswith("cuda"):
      kw["device"] = "cpu"
    return to(self, *args, **kw)

  torch.Tensor.to = cpu_to


def logit_diff(logits, row, model):
  """Correct minus incorrect logit at the last position of a one-row batch."""
  del model
  last = logits[0, -1] if logits.ndim == 3 else logits[-1]
  return last[int(row["correct_id"])] - last[int(row["incorrect_id"])]


class Rows(peap_exp.Experiament):
  """PEAP's experiment over the SPEC's CSVs: every row, counterfactual or zero ablation."""

  def create_datasets(self):
    return pd.read_csv(self.clean_dataset_path), pd.read_csv(self.counter_dataset_path)

  def get_mean_activations(self, *args, **kwargs):
    raise NotImplementedError("mean ablation is PEAP's own (a sample of the ablation split)")

  def get_df_for_eval(self, n_examples):
    raise NotImplementedError


def _name(layer, head, kind, end) -> str:
  """EAP-IG's name of a PEAP node: `r` is the input node upstream, the logits downstream (`end`)."""
  if kind == "r":
    return "logits" if end else "input"
  if kind == "h":
    return f"a{layer}.h{head}"
  if kind == "m":
    return f"m{layer}"
  return f"a{layer}.h{head}<{kind}>"


def main(spec_path: str) -> None:
  spec = json.load(open(spec_path))
  out = os.path.dirname(os.path.abspath(spec_path))
  model = hooked_on_cpu(spec["checkpoint"])
  _cpu_for_cuda_moves()
  peap.HookedTransformer.from_pretrained = staticmethod(lambda *a, **k: model)
  n = len(pd.read_csv(spec["clean"]))
  experiment = Rows(exp_name="rows", model_name="gpt2", model_path=spec["checkpoint"],
                    ablation_type=spec["ablation"], clean_dataset_path=spec["clean"],
                    counter_dataset_path=spec["counter"], spans=spec["spans"], metric=logit_diff,
                    seed=0)
  path = os.path.join(out, "peap.pkl")
  peap.position_aware_edge_attribution_patching(exp=experiment, dataset_size=n, save_path=path)
  with open(path, "rb") as f:
    results = pickle.load(f).results
  edges = {}
  for edge, score in results.items():
    if edge.is_crossing:
      continue
    up = _name(edge.upstream_layer_idx, edge.upstream_head_idx, edge.upstream_type, False)
    down = _name(edge.downstream_layer_idx, edge.downstream_head_idx, edge.downstream_type, True)
    edges[f"{up}->{down}"] = {k: [float(x) for x in score[f"{k}_score"]]
                              for k in ("sum", "avg", "max_abs")}
  with open(os.path.join(out, "peap.json"), "w") as f:
    json.dump({"n_rows": n, "edges": edges}, f)


if __name__ == "__main__":
  main(sys.argv[1])
